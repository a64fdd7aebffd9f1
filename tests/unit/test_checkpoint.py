"""trainer/runtime/checkpoint.py: RNG state, exports. (DeepSpeed checkpoints: tests/runtime/test_engine.py.)"""
from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
import torch

from trainer.config import ModelConfig, RunConfig
from trainer.fileio import atomic_write_text, sha256_file
from trainer.runtime.checkpoint import CheckpointError, capture_rng, export_weights, load_exported, restore_rng


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.randn(2).tolist()


def test_rng_roundtrip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draws()
    state = json.loads(json.dumps(capture_rng()))  # plain values only
    expected = _draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(state)
    assert _draws() == expected


def test_sha256_file_and_atomic_write(tmp_path):
    p = tmp_path / "x.txt"
    atomic_write_text(p, "hello\n")
    assert p.read_text() == "hello\n" and list(tmp_path.iterdir()) == [p]
    assert sha256_file(p) == hashlib.sha256(b"hello\n").hexdigest()
    assert p.stat().st_mode & 0o044  # readable by others (mkstemp would give 0600)


def _state(seed=0, d=8):
    g = torch.Generator().manual_seed(seed)
    return {"emb.weight": torch.randn(16, d, generator=g), "head.bias": torch.randn(16, generator=g)}


def test_export_roundtrip_raw_and_ema(tmp_path):
    cfg = RunConfig(name="exp")
    raw, ema = _state(0), _state(1)
    out = export_weights(tmp_path / "export", raw, ema, cfg, step=42)
    expected = ["config.yaml", "ema.safetensors", "export.json", "model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == expected
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp folder left behind
    info = json.loads((out / "export.json").read_text())
    assert info["step"] == 42 and info["param_count"] == 16 * 8 + 16
    assert info["files"]["model.safetensors"]["sha256"] == sha256_file(out / "model.safetensors")
    for which, ref in (("raw", raw), ("ema", ema)):
        sd, got_cfg = load_exported(out, which, expect_model=cfg.model)
        assert got_cfg == cfg
        assert sorted(sd) == sorted(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_export_never_overwrites_in_place(tmp_path):
    cfg = RunConfig()
    out = export_weights(tmp_path / "e", _state(0), _state(0), cfg, step=1)
    with pytest.raises(FileExistsError, match="already exists"):
        export_weights(out, _state(1), _state(1), cfg, step=2)
    assert json.loads((out / "export.json").read_text())["step"] == 1
    export_weights(out, _state(1), _state(1), cfg, step=2, overwrite=True)
    sd, _ = load_exported(out, "raw")
    assert torch.equal(sd["head.bias"], _state(1)["head.bias"])
    assert [p.name for p in tmp_path.iterdir()] == ["e"]


def test_load_exported_refuses_corruption_and_mismatch(tmp_path):
    out = export_weights(tmp_path / "e", _state(0), _state(1), RunConfig(), step=3)
    # a flipped byte in the EMA file: sha256 mismatch naming the file
    f = out / "ema.safetensors"
    b = bytearray(f.read_bytes())
    b[-1] ^= 0x01
    f.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: sha256 .*\(corrupt\)"):
        load_exported(out, "ema")
    load_exported(out, "raw")  # the other file is still fine
    # truncation
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: size 100 bytes.*\(truncated or altered\)"):
        load_exported(out, "raw")


def test_load_exported_model_and_shape_checks(tmp_path):
    out = export_weights(tmp_path / "e", _state(0), _state(0), RunConfig(), step=3)
    with pytest.raises(CheckpointError, match=r"config\.yaml.*model\.d_model: stored 128, expected 256"):
        load_exported(out, "raw", expect_model=ModelConfig(d_model=256))
    info = json.loads((out / "export.json").read_text())
    info["shapes"]["emb.weight"] = [16, 4]
    (out / "export.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*emb\.weight"):
        load_exported(out, "raw")
    with pytest.raises(CheckpointError, match="export.json: missing"):
        load_exported(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="different keys or shapes"):
        export_weights(tmp_path / "f", _state(0), {"x": torch.zeros(1)}, RunConfig(), step=0)
    assert not (tmp_path / "f").exists()
