"""Weight sync over many steps of real training: receivers stay bit-identical, drift is refused."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from rlsparse.delta.sync import LoadWeightsReceiver, SyncReceiver, SyncSender
from rlsparse.delta.transport import FileTransport, SocketTransport
from rlsparse.errors import MismatchError

from deltahelpers import bits_of


def _train_steps(model, steps: int, lr: float = 3e-3, seed: int = 0):
    """Real AdamW steps of causal-LM training on random tokens (fp32 master weights)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        yield


def _bf16_bits(model) -> dict:
    return {n: bits_of(t.detach().to(torch.bfloat16)) for n, t in model.state_dict().items()}


def test_sync_over_many_steps_keeps_receivers_bit_identical(tmp_path):
    from tinymodels import tiny_llama

    model = tiny_llama(dtype=torch.float32)
    receiver_model = copy.deepcopy(model).to(torch.bfloat16)
    receiver_dict = {n: t.clone() for n, t in receiver_model.state_dict().items()}
    sender = SyncSender(model, "bf16", chunk_elements=512)
    rx_module, rx_dict = SyncReceiver(receiver_model), SyncReceiver(receiver_dict)
    tx, rx = SocketTransport.pair()
    files = FileTransport(tmp_path / "sync")
    previous = _bf16_bits(model)
    for step, _ in enumerate(_train_steps(model, 12), 1):
        payload, report = sender.sync(model)
        now = _bf16_bits(model)
        brute = sum(int((now[n] != previous[n]).sum()) for n in now)
        assert report.changed == brute and report.step == step
        assert report.full_bf16_bytes == 2 * sum(t.numel() for t in now.values())
        got = []
        t = threading.Thread(target=lambda: got.append(rx.receive()))
        t.start()
        tx.send(payload)
        t.join()
        assert got[0] == payload
        files.send(payload)
        rx_module.receive(got[0])
        rx_dict.receive(FileTransport(tmp_path / "sync").receive() if step == 1 else payload)
        for n, bits in now.items():
            assert torch.equal(bits_of(receiver_model.state_dict()[n]), bits), (step, n)
            assert torch.equal(bits_of(receiver_dict[n]), bits), (step, n)
        previous = now
    tx.close()
    rx.close()


def test_a_drifted_receiver_is_refused_and_left_untouched():
    from tinymodels import tiny_llama

    model = tiny_llama(dtype=torch.float32)
    copy_ = {n: t.detach().to(torch.bfloat16).clone() for n, t in model.state_dict().items()}
    sender = SyncSender(model)
    receiver = SyncReceiver(copy_)
    for _ in _train_steps(model, 1):
        pass
    payload, _ = sender.sync(model)
    name = "model.layers.1.mlp.down_proj.weight"
    copy_[name].view(-1)[3] += 1  # the inference copy drifted
    before = {n: t.clone() for n, t in copy_.items()}
    with pytest.raises(MismatchError, match=name.replace(".", r"\.")):
        receiver.receive(payload)
    for n in before:
        assert torch.equal(bits_of(before[n]), bits_of(copy_[n])), n


def test_load_weights_adapter_hands_over_only_changed_tensors():
    """vLLM's ``load_weights(iterable of (name, tensor))`` path, against a recording fake engine
    (vLLM itself is not installed here)."""
    from tinymodels import tiny_llama

    model = tiny_llama(dtype=torch.float32)

    class FakeEngine:
        def __init__(self):
            self.calls = []

        def load_weights(self, weights):
            self.calls.append({n: t.clone() for n, t in weights})

    engine = FakeEngine()
    rx = LoadWeightsReceiver(engine.load_weights, model.state_dict())
    sender = SyncSender(model)
    before = _bf16_bits(model)
    with torch.no_grad():  # change two tensors only
        model.model.layers[0].self_attn.q_proj.weight[0, :4] += 0.5
        model.model.norm.weight[1] += 0.5
    payload, report = sender.sync(model)
    rx.receive(payload)
    after = _bf16_bits(model)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert set(engine.calls[0]) == changed == {"model.layers.0.self_attn.q_proj.weight", "model.norm.weight"}
    for n, t in engine.calls[0].items():
        assert t.dtype == torch.bfloat16 and torch.equal(bits_of(t), after[n])
    assert report.changed == 5


def test_callback_syncs_every_n_steps_from_a_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from rlsparse.delta import DeltaSyncCallback
    from tinymodels import tiny_llama

    model = tiny_llama(dtype=torch.float32)
    receiver = {n: t.detach().to(torch.bfloat16).clone() for n, t in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 96, (8, 10), generator=g)]
    transport = FileTransport(tmp_path / "sync")
    cb = DeltaSyncCallback(transport, every=2, report_path=tmp_path / "sync.jsonl")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    assert [r.step for r in cb.reports] == [2, 4, 6]
    rx = SyncReceiver(receiver)
    inbox = FileTransport(tmp_path / "sync")
    for _ in cb.reports:
        rx.receive(inbox.receive(timeout=1))
    final = _bf16_bits(model)
    for n, bits in final.items():
        assert torch.equal(bits_of(receiver[n]), bits), n
    assert len((tmp_path / "sync.jsonl").read_text().splitlines()) == 3


@pytest.mark.distributed
def test_sync_over_torch_distributed_gloo(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    from _gloo_worker import run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(port, str(tmp_path), 4), nprocs=2, join=True)
    sent, received = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    assert sent["bits"] == received["bits"]  # the trainer's weights in bf16 == the receiver's
