class SparseAdamW: pass
