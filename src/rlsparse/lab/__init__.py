"""The reproduction lab: the paper's experiments in miniature on a tiny Llama.

Modules: ``tasks`` (synthetic verifiable tasks, exact-answer reward), ``tokenizer`` and ``base``
(the cached tiny pretrained base), ``data`` (per-recipe training data), ``recipes`` (typed JSON
configs), ``runner`` (TRL training, measurement, Conjecture 1 reruns), ``measure`` (the one place
that uses diff/masks/analysis/train), ``report`` (HTML/Markdown), ``demo``.

Example:
    >>> from rlsparse.lab.runner import LabOptions, run_lab
    >>> run_lab(["grpo", "sft_ood"], LabOptions(out="runs/x", quick=True))
"""
