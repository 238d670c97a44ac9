import json

import pytest
import torch

from saebench.sae.load import load_sae
from saebench.train import TrainConfig, Trainer
from saebench.train.batches import rebatch
from saebench.train.state import STATE_FILE
from saebench.train.trainer import HISTORY_FILE

from .conftest import planted_batches

D = 24


def tiny(**overrides) -> TrainConfig:
    base = dict(n_latents=96, k=4, batch_size=128, lr=3e-3, geometric_median_tokens=512, log_every=10)
    return TrainConfig(**{**base, **overrides})


def test_loss_decreases_and_decoder_stays_unit_norm():
    data = planted_batches(60, 128, d=D)
    trainer = Trainer(tiny(max_tokens=60 * 128), D)
    sae = trainer.fit(data, progress=False)
    first, last = trainer.history[0], trainer.history[-1]
    assert last["nmse"] < 0.75 * first["nmse"]
    assert last["l0"] == pytest.approx(4.0)
    norms = trainer.model.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-6)
    assert trainer.step == 60 and trainer.tokens_seen == 60 * 128
    assert sae.k == 4 and sae.normalization.kind == "layer_norm"
    dead = trainer.provenance()["dead_history"]  # the dead count over training, one point per log step
    assert [t for t, _ in dead] == [row["tokens"] for row in trainer.history] and len(dead) == 6
    assert all(0 <= f <= 1 for _, f in dead)


def test_a_last_batch_of_one_token_is_not_trained_on():
    # 10 batches and one token: one token has no variance, so its nmse (the loss) is 0/0 and NaNs the weights
    data = [torch.cat(list(planted_batches(10, 128, d=D)))]
    data = [torch.cat([data[0], data[0][:1]])]
    trainer = Trainer(tiny(max_tokens=10 * 128 + 1), D)
    sae = trainer.fit(data, progress=False)
    assert trainer.step == 10 and trainer.tokens_seen == 10 * 128 + 1 and trainer.finished
    assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_b_pre_is_the_geometric_median_and_encoder_is_tied_at_init():
    data = planted_batches(4, 128, d=D)
    trainer = Trainer(tiny(), D)
    trainer.initialize(torch.cat(data))
    u, _ = trainer.normalization.apply(torch.cat(data).double())
    distance = lambda y: (u - y).norm(dim=1).sum()  # noqa: E731
    b_pre = trainer.model.b_pre.detach().double()
    assert distance(b_pre) < distance(u.mean(0))
    assert torch.equal(trainer.model.W_enc, trainer.model.W_dec)
    untied = Trainer(tiny(tied_init=False), D)
    untied.initialize(torch.cat(data))
    assert not torch.allclose(untied.model.W_enc, untied.model.W_dec)


def _revived(auxk_alpha: float) -> int:
    data = planted_batches(80, 128, d=D, seed=2)
    config = tiny(max_tokens=80 * 128, auxk_alpha=auxk_alpha, dead_tokens=256, n_latents=64)
    trainer = Trainer(config, D)
    trainer.initialize(torch.cat(data[:4]))
    forced = torch.arange(16)
    with torch.no_grad():
        trainer.model.W_enc[forced] *= 0.02  # tiny pre-activations: never among the top k
    trainer.fit(data, progress=False)
    eval_x = torch.cat(planted_batches(8, 128, d=D, seed=3))
    codes = trainer.to_sae().encode_sparse(trainer.normalization.apply(eval_x)[0])
    fired = torch.zeros(64, dtype=torch.bool)
    fired[codes.indices[codes.values > 0]] = True
    return int(fired[forced].sum())


def test_auxk_revives_latents_forced_dead():
    assert _revived(auxk_alpha=0.0) == 0
    assert _revived(auxk_alpha=1 / 32) >= 14


class Killed(Exception):
    pass


def _killed_after(batches, n):
    for i, batch in enumerate(batches):
        if i == n:
            raise Killed
        yield batch


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    data = planted_batches(20, 128, d=D, seed=4)
    config = tiny(max_tokens=20 * 128, checkpoint_every=3, dead_tokens=512)
    reference = Trainer(config, D)
    reference.fit(data, progress=False)

    with pytest.raises(Killed):
        Trainer(config, D, out_dir=tmp_path).fit(_killed_after(data, 11), progress=False)
    resumed = Trainer.resume(tmp_path)
    assert resumed.step == 9 and resumed.tokens_seen == 9 * 128
    resumed.fit(data, progress=False)
    assert resumed.step == reference.step
    for name, value in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    assert torch.equal(resumed.tokens_since_fired, reference.tokens_since_fired)


def test_checkpoint_loads_and_reproduces_the_trainer(tmp_path):
    data = planted_batches(10, 128, d=D, seed=5)
    trainer = Trainer(tiny(max_tokens=10 * 128, seed=7), D, out_dir=tmp_path)
    trainer.fit(data, progress=False)
    assert (tmp_path / STATE_FILE).is_file()
    sae = load_sae(trainer.sae_dir)
    x = torch.cat(planted_batches(2, 128, d=D, seed=6))
    u, state = trainer.normalization.apply(x)
    with torch.no_grad():
        out = trainer.model(u)
        rec = sae.reconstruct(x)
    torch.testing.assert_close(rec.u_hat, out.u_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rec.x_hat, trainer.normalization.undo(out.u_hat, state), rtol=1e-5, atol=1e-5)
    cfg = json.loads((trainer.sae_dir / "cfg.json").read_text())
    training = cfg["training"]
    assert training["tokens_seen"] == 10 * 128 and training["seed"] == 7 and training["complete"]
    assert training["config"]["n_latents"] == 96 and training["lr"] == 3e-3
    assert training["lr_source"] == "set"
    # the log so far, one line per log step, beside the checkpoint: the dead fraction over training
    lines = (tmp_path / HISTORY_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == trainer.history and len(lines) == 1
    assert {"step", "tokens", "nmse", "l0", "auxk_nmse", "dead_frac"} <= set(trainer.history[0])
    assert cfg["normalization"]["kind"] == "layer_norm" and cfg["k"] == 4


def test_relu_baseline_learns_at_a_fixed_lambda_after_warmup():
    data = planted_batches(40, 128, d=D, seed=8)
    config = tiny(activation="relu", max_tokens=40 * 128, l1_coefficient=0.2, l1_warmup=0.25, log_every=5)
    trainer = Trainer(config, D)
    # lambda ramps linearly over the first 10 of 40 steps, then stays at the configured value
    ramp = [trainer.l1_coefficient_at(step) for step in range(40)]
    assert ramp[0] == pytest.approx(0.02) and ramp[4] == pytest.approx(0.1)
    assert ramp[9:] == [0.2] * 31
    trainer.fit(data, progress=False)
    history = trainer.history
    assert history[0]["l1_coefficient"] < 0.2 and history[-1]["l1_coefficient"] == 0.2
    assert history[-1]["l0"] < 0.85 * history[0]["l0"]
    assert history[-1]["nmse"] < history[0]["nmse"]
    assert trainer.provenance()["l1_coefficient"] == 0.2


def test_relu_encoder_starts_scaled_so_first_reconstructions_have_the_input_scale():
    config = tiny(activation="relu", n_latents=480)
    trainer = Trainer(config, D)
    data = planted_batches(1, 512, d=D, seed=3)[0]
    trainer.initialize(data)
    norms = trainer.model.W_enc.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 2 * D / 480))
    u, _ = trainer.normalization.apply(data)
    out = trainer.model(u)
    # unit encoder rows would give nmse ~ (n / 2d)^2 = 100 here; the scaled init starts near 1
    assert out.nmse < 2
    topk = Trainer(tiny(), D)
    topk.initialize(data)
    torch.testing.assert_close(topk.model.W_enc.norm(dim=1), torch.ones(96))


def test_relu_chunked_backward_equals_one_chunk():
    data = planted_batches(3, 128, d=D, seed=9)
    runs = []
    for chunk_elements in (96 * 128, 96 * 10):
        trainer = Trainer(tiny(activation="relu", chunk_elements=chunk_elements, dtype="float64"), D)
        trainer.fit(data, progress=False)
        runs.append(trainer.model.state_dict())
    for name, value in runs[0].items():
        torch.testing.assert_close(runs[1][name], value, rtol=1e-9, atol=1e-12)


def test_rebatch_recuts_in_order():
    parts = [torch.arange(i, i + n).float()[:, None] for i, n in ((0, 5), (5, 1), (6, 9))]
    out = list(rebatch(parts, 4))
    assert [b.shape[0] for b in out] == [4, 4, 4, 3]
    assert torch.equal(torch.cat(out), torch.arange(15).float()[:, None])


def test_config_round_trips_and_rejects_bad_values():
    config = tiny(multi_topk=True)
    assert TrainConfig(**json.loads(json.dumps(config.to_dict()))) == config
    assert TrainConfig(n_latents=4 * 16384).effective_lr() == pytest.approx(1e-4)
    assert TrainConfig(max_tokens=100_000_000).effective_dead_tokens() == 5_000_000
    assert TrainConfig().effective_dead_tokens() == 10_000_000
    with pytest.raises(ValueError, match="AuxK"):
        TrainConfig(activation="relu", auxk_alpha=0.1)
    with pytest.raises(ValueError, match="k <= n_latents"):
        TrainConfig(k=10, n_latents=8)
    with pytest.raises(ValueError, match="l1_warmup"):
        TrainConfig(activation="relu", l1_warmup=1.5)
    with pytest.raises(ValueError, match="encoder_init_scale"):
        TrainConfig(encoder_init_scale=0.0)


def _trained(config, data, *, recycle=True, fused=True, monkeypatch=None):
    import saebench.train.trainer as trainer_module

    if not fused:
        monkeypatch.setattr(trainer_module, "FUSED_ADAM_DEVICES", ())
    trainer = Trainer(config, D)
    if not recycle:
        trainer.model.recycle_gradients = lambda: None  # gradients freed by zero_grad, fresh ones each step
    trainer.initialize(torch.cat(data[:4]))
    with torch.no_grad():
        trainer.model.W_enc[:24] *= 0.02  # dead after dead_tokens: AuxK runs
    trainer.fit(data, progress=False)
    return trainer


def test_recycled_gradient_buffers_change_nothing(monkeypatch):
    data = planted_batches(12, 128, d=D, seed=10)
    config = tiny(max_tokens=12 * 128, dead_tokens=256, multi_topk=True)
    recycled = _trained(config, data)
    fresh = _trained(config, data, recycle=False)
    assert recycled.history[-1]["auxk_nmse"] > 0
    assert len(recycled.model._gradient_pool) == 2
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(recycled.model.state_dict()[name], value), name


def test_fused_adam_matches_the_for_loop_adam_to_rounding(monkeypatch):
    data = planted_batches(12, 128, d=D, seed=11)
    config = tiny(max_tokens=12 * 128, dead_tokens=256, dtype="float64")
    fused = _trained(config, data)
    assert fused.optimizer.defaults["fused"]
    loop = _trained(config, data, fused=False, monkeypatch=monkeypatch)
    assert not loop.optimizer.defaults["fused"]
    for name, value in loop.model.state_dict().items():
        torch.testing.assert_close(fused.model.state_dict()[name], value, rtol=1e-12, atol=1e-14)
