"""HQ-SAM loading: the real state-dict path, its error messages, and checkpoint fingerprints."""

from __future__ import annotations

import pytest
import torch

from boxrefine.shared.model import weights as weights_mod
from boxrefine.shared.model.sam import build_hq_sam
from boxrefine.shared.model.weights import CheckpointError, checkpoint_info, load_state_dict_file


@pytest.fixture(scope="module")
def state(sam):
    return {k: v.clone() for k, v in sam.state_dict().items()}


def test_truncated_checkpoint_is_a_one_line_error(tmp_path, state):
    ckpt = tmp_path / "sam_hq_vit_tiny.pth"
    torch.save(state, ckpt)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError) as e:
        build_hq_sam("vit_tiny", ckpt, 0, announce=False)
    assert str(ckpt) in str(e.value) and "\n" not in str(e.value)


def test_not_a_state_dict_is_refused(tmp_path):
    ckpt = tmp_path / "x.pth"
    torch.save([1, 2, 3], ckpt)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_state_dict_file(ckpt)


def test_pickled_code_is_refused_weights_only(tmp_path):
    ckpt = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": torch.nn.Linear(1, 1)}, ckpt)  # a module needs full unpickling
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_state_dict_file(ckpt)


def test_plain_sam_checkpoint_reports_missing_hq_keys(tmp_path, state, capsys):
    plain = {k: v for k, v in state.items() if "hf_" not in k and "compress_vit_feat" not in k
             and "embedding_encoder" not in k and "embedding_maskfeature" not in k}
    assert len(plain) < len(state)
    ckpt = tmp_path / "sam_plain.pth"
    torch.save({"model": plain}, ckpt)  # nested {"model": ...} is accepted too
    model = build_hq_sam("vit_tiny", ckpt, 0, announce=False)
    err = capsys.readouterr().err
    assert f"{len(state) - len(plain)} missing" in err
    # the keys that were there were really loaded
    k = next(iter(plain))
    assert torch.equal(model.state_dict()[k], plain[k])


def test_wrong_model_type_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(3)}, ckpt)
    with pytest.raises(CheckpointError, match="no key matches"):
        build_hq_sam("vit_tiny", ckpt, 0, announce=False)


def test_official_checkpoint_named_by_sha256_and_type_checked(tmp_path, monkeypatch):
    ckpt = tmp_path / "renamed.pth"
    ckpt.write_bytes(b"pretend weights")
    digest = weights_mod.file_sha256(ckpt)
    monkeypatch.setitem(weights_mod.OFFICIAL_CHECKPOINTS, digest, ("vit_b", "sam_hq_vit_b.pth"))
    info = checkpoint_info("vit_b", ckpt, 0)
    assert info.official_name == "sam_hq_vit_b.pth" and info.fingerprint == f"sha256:{digest}"
    with pytest.raises(CheckpointError, match="official sam_hq_vit_b.pth"):
        checkpoint_info("vit_tiny", ckpt, 0)


def test_sha256_cache_notices_a_changed_file(tmp_path):
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"one")
    first = checkpoint_info("vit_tiny", ckpt, 0).sha256
    ckpt.write_bytes(b"two!")  # new size and mtime
    assert checkpoint_info("vit_tiny", ckpt, 0).sha256 != first


def test_random_init_is_seeded_and_announced(capsys):
    a = build_hq_sam("vit_tiny", None, 5)
    b = build_hq_sam("vit_tiny", None, 5, announce=False)
    c = build_hq_sam("vit_tiny", None, 6, announce=False)
    k = "mask_decoder.hf_token.weight"
    assert torch.equal(a.state_dict()[k], b.state_dict()[k])
    assert not torch.equal(a.state_dict()[k], c.state_dict()[k])
    assert "RANDOMLY INITIALISED" in capsys.readouterr().err
    assert all(not p.requires_grad for p in a.parameters())


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint_info("vit_tiny", tmp_path / "nope.pth", 0)


def test_heads_without_encoder_equal_the_full_models(tmp_path, sam):
    """train/evaluate build only the prompt encoder + HQ decoder; they must hold the same weights
    the full model (used by extract) has — for random init and from a checkpoint file."""
    from boxrefine.shared.model.sam import build_sam_heads

    def same(heads, full):
        hs = heads.state_dict()
        fs = {k: v for k, v in full.state_dict().items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
        assert set(hs) == set(fs)
        assert all(torch.equal(hs[k], fs[k]) for k in hs)

    same(build_sam_heads("vit_tiny", None, 0, announce=False), sam)
    other = build_hq_sam("vit_tiny", None, 9, announce=False)
    ckpt = tmp_path / "w.pth"
    torch.save(other.state_dict(), ckpt)
    same(build_sam_heads("vit_tiny", ckpt, 0, announce=False), other)
    with pytest.raises(AssertionError):
        same(build_sam_heads("vit_tiny", None, 1, announce=False), sam)
