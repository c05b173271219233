"""Hostile input: loading never executes code, and garbage gives a GenbenchError, never a crash.

- Training checkpoints and run.json are validated field by field (types, ranges, unknown keys);
  a pickle disguised as a checkpoint is refused without being unpickled.
- Property-based (hypothesis): random bytes, truncations and byte flips of checkpoint files, of
  images in a `folder` dataset, and random values in JSON configs and `--set` items end in the
  project's clear error (GenbenchError) or a valid result, never another exception or a hang.
  (The idx reader has its own properties in tests/test_data.py.)
"""

import hashlib
import io
import json
import pickle
import re
import shutil
import struct
import tempfile
import zlib
from dataclasses import fields
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save as st_save

from genbench.files import read_json, read_tensors
from genbench.config import from_dict
from genbench.data import ImageDataset, load_dataset
from genbench.errors import GenbenchError
from genbench.models.ae import AEConfig
from genbench.models.vae import VAEConfig
from genbench.training.config import TrainConfig
from genbench.training.loop import Interrupted
from genbench.training.run import resolve_configs, train_run

TINY = ["latent_dim=4", "width=32", "arch=mlp", "train.steps=24", "train.batch_size=32",
        "train.ckpt_every=6", "train.log_every=4", "train.lr=1e-3", "train.ema_decay=0.5"]
CK = "checkpoints/main-00000012"
PROPERTY = settings(max_examples=40, deadline=timedelta(seconds=20),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_digits):
    """An AE run (with EMA) interrupted right after its step-12 checkpoint."""
    run = tmp_path_factory.mktemp("hostile") / "cut"
    with pytest.raises(Interrupted):
        train_run("ae", tiny_digits, run, sets=TINY, progress=False, interrupt_at=12)
    return run


@pytest.fixture
def cut(template, tmp_path):
    run = tmp_path / "cut"
    shutil.copytree(template, run)
    return run


def _resume(run, data):
    return train_run("ae", data, run, resume=True, progress=False)


def _edit_json(path: Path, fn) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def _replace_tensor_file(run: Path, data: bytes) -> None:
    """Put `data` in place of state.safetensors and record its true size and hash in state.json,
    as an attacker able to write both files would: only the format check is left to stop it."""
    (run / CK / "state.safetensors").write_bytes(data)
    _edit_json(run / CK / "state.json",
               lambda m: m.update(tensors={"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))


def _edit_tensors(run: Path, fn) -> None:
    tensors = read_tensors(run / CK / "state.safetensors")
    fn(tensors)
    _replace_tensor_file(run, st_save(tensors))


# ---------------------------------------------------------------- pickles are never unpickled


class _Boom:
    """Unpickling this creates a file: evidence that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_pickle_disguised_as_training_checkpoint_is_never_unpickled(cut, tiny_digits, tmp_path, kind):
    marker = str(tmp_path / "pwned")
    if kind == "pickle":
        payload = pickle.dumps({"model.encoder.0.weight": _Boom(marker)})
    else:  # torch's zip format holds a pickle too
        buf = io.BytesIO()
        torch.save({"model.encoder.0.weight": _Boom(marker)}, buf)
        payload = buf.getvalue()
    _replace_tensor_file(cut, payload)
    with pytest.raises(GenbenchError, match="state.safetensors: not a valid safetensors file"):
        _resume(cut, tiny_digits)
    assert not Path(marker).exists()


# ---------------------------------------------------------------- JSON validated field by field


def _state(fn):
    return lambda run: _edit_json(run / CK / "state.json", fn)


def _run(fn):
    return lambda run: _edit_json(run / "run.json", fn)


def _group(m):
    return m["optimizers"]["main"][0]


@pytest.mark.parametrize("tamper, match", [
    # state.json: types, ranges, unknown keys
    (_state(lambda m: m.update(step="12")), "field 'step' must be int"),
    (_state(lambda m: m.update(step=True)), "field 'step' must be int"),
    (_state(lambda m: m.update(step=10**6)), r"step 1000000 is outside \[0, 24\]"),
    (_state(lambda m: m.update(step=-1)), "outside"),
    (_state(lambda m: m.update(stage="prior")), "stage 'prior' is not a stage of this model"),
    (_state(lambda m: m.update(format_version=99)), "format_version 99 is not 1"),
    (_state(lambda m: m.pop("optimizers")), "field 'optimizers' must be dict"),
    (_state(lambda m: m.update(tensors={"size": "1", "sha256": "x"})), "field 'size' must be int"),
    (_state(lambda m: m.update(summary={"stages": {"main": {"wall_time_s": "fast"}}})), "field 'wall_time_s'"),
    (_state(lambda m: _group(m).update(lr="fast")), "setting 'lr' = 'fast' has the wrong type"),
    (_state(lambda m: _group(m).update(betas=[0.9])), "setting 'betas'"),
    (_state(lambda m: _group(m).update(amsgrad=1)), "setting 'amsgrad'"),
    (_state(lambda m: _group(m).update(exec="os.system('rm -rf /')")), r"unknown setting\(s\) \['exec'\]"),
    (_state(lambda m: _group(m).update(params=[0])), "parameter groups do not match the model"),
    (_state(lambda m: m["optimizers"].update(disc=m["optimizers"]["main"])), r"unknown group\(s\) \['disc'\]"),
    (_state(lambda m: m["optimizers"].update(main={})), "must have 1 parameter group"),
    # latest.json: a pointer, never a path
    (lambda r: (r / "checkpoints/latest.json").write_text('["main-00000012"]'), "expected a JSON object"),
    (lambda r: (r / "checkpoints/latest.json").write_text('{"checkpoint": 12}'), "field 'checkpoint' must be str"),
    (lambda r: (r / "checkpoints/latest.json").write_text('{"checkpoint": "../../etc"}'), "invalid checkpoint name"),
    (lambda r: (r / "checkpoints/latest.json").write_text('{"checkpoint": ".main-00000012.partial"}'),
     "invalid checkpoint name"),
    # run.json: its configs go through the typed parser
    (_run(lambda i: i["train_config"].update(lr=-1.0)), "lr must be > 0"),
    (_run(lambda i: i["train_config"].update(steps="24")), "train_config.steps: expected an integer"),
    (_run(lambda i: i["train_config"].update(seed=2**40)), r"seed must be in \[0, 2\*\*32\)"),
    (_run(lambda i: i["train_config"].update(device="cuda; rm -rf /")), "device must be auto, cpu or cuda"),
    (_run(lambda i: i["train_config"].update(stages={"prior": {"steps": 1}})), r"stages \['prior'\] are not stages"),
    (_run(lambda i: i["model_config"].update(__class__="os.system")), r"unknown field\(s\) \['__class__'\]"),
    (_run(lambda i: i["model_config"].update(latent_dim=0)), "latent_dim must be >= 1"),
    (_run(lambda i: i.update(status="pwned")), "status must be 'running' or 'complete'"),
    (_run(lambda i: i.pop("model_config")), "field 'model_config' must be dict"),
    (lambda r: (r / "run.json").write_text("[1, 2]"), "run.json: expected a JSON object"),
])
def test_tampered_json_is_refused(cut, tiny_digits, tamper, match):
    tamper(cut)
    with pytest.raises(GenbenchError, match=match):
        _resume(cut, tiny_digits)


@pytest.mark.parametrize("tamper, match", [
    (lambda t: t.update({"evil.payload": torch.zeros(3)}), r"unexpected tensors \['evil.payload'\]"),
    (lambda t: t.pop("model.encoder.net.0.weight"), "missing"),
    (lambda t: t.update({"model.encoder.net.0.weight": torch.zeros(3, 3)}), "has shape"),
    (lambda t: t.update({"ema.encoder.net.0.weight": torch.zeros(3, 3)}), "EMA weights: encoder.net.0.weight has shape"),
    (lambda t: t.pop("ema.encoder.net.0.weight"), "EMA weights: do not match the model"),
    (lambda t: t.update({"optim.main.0.exp_avg": torch.zeros(7)}), "optimizer tensor 'optim.main.0.exp_avg'"),
    (lambda t: t.update({"optim.main.999.exp_avg": torch.zeros(7)}), "unexpected optimizer tensor"),
    (lambda t: t.update({"optim.main.0.__reduce__": torch.zeros(1)}), "unexpected optimizer tensor"),
])
def test_tampered_tensors_are_refused(cut, tiny_digits, tamper, match):
    _edit_tensors(cut, tamper)
    with pytest.raises(GenbenchError, match=match):
        _resume(cut, tiny_digits)


def test_untampered_copy_resumes(cut, tiny_digits):
    """The control: the fixture's run resumes fine, so the refusals above come from the tampering."""
    _edit_tensors(cut, lambda t: None)  # rewritten with a fresh hash, same content
    _resume(cut, tiny_digits)
    assert json.loads((cut / "run.json").read_text())["status"] == "complete"


# ---------------------------------------------------------------- property: damaged checkpoint files


FILES = ["checkpoints/latest.json", f"{CK}/state.json", f"{CK}/state.safetensors", "run.json"]


def _damage_then_resume(template, data, path, content):
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "cut"
        shutil.copytree(template, run)
        if path == f"{CK}/state.safetensors":
            _replace_tensor_file(run, content)  # hash made to match: the format check must catch it
        else:
            (run / path).write_bytes(content)
        with pytest.raises(GenbenchError):
            _resume(run, data)


@PROPERTY
@given(path=st.sampled_from(FILES), content=st.binary(max_size=300))
def test_random_bytes_in_run_files_are_refused(template, tiny_digits, path, content):
    _damage_then_resume(template, tiny_digits, path, content)


@PROPERTY
@given(path=st.sampled_from(FILES), cut_at=st.floats(0, 1, exclude_max=True))
def test_truncated_run_files_are_refused(template, tiny_digits, path, cut_at):
    original = (template / path).read_bytes().rstrip()  # dropping a trailing newline is no damage
    _damage_then_resume(template, tiny_digits, path, original[: int(cut_at * len(original))])


@PROPERTY
@given(path=st.sampled_from(FILES[:2] + FILES[3:]), flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                                              st.integers(1, 255)), min_size=1, max_size=4))
def test_byte_flips_in_json_are_refused_or_harmless(template, tiny_digits, path, flips):
    """A flipped byte in JSON either breaks it (GenbenchError) or changes a value, which is then
    validated like any other: the outcome is an error or a well-formed run, never a crash."""
    original = bytearray((template / path).read_bytes())
    for where, xor in flips:
        original[int(where * len(original))] ^= xor
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "cut"
        shutil.copytree(template, run)
        (run / path).write_bytes(bytes(original))
        try:
            _resume(run, tiny_digits)
        except GenbenchError:
            return
        assert json.loads((run / "run.json").read_text())["status"] == "complete"


# ---------------------------------------------------------------- property: image-folder loader


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


_RNG = np.random.default_rng(0)
VALID = {
    "png": _png(_RNG.integers(0, 256, (12, 10), dtype=np.uint8)),
    "png_rgb": _png(_RNG.integers(0, 256, (9, 9, 3), dtype=np.uint8)),
    "jpg": _jpeg(_RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
}


def _load_folder_with(content: bytes, suffix: str):
    """A folder of one good image and `content`: a dataset in [0, 1], or a GenbenchError."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "a_good.png").write_bytes(VALID["png"])
        (Path(tmp) / f"b_fuzzed{suffix}").write_bytes(content)
        try:
            ds = load_dataset("folder", data_dir=tmp, image_size=8)
        except GenbenchError as e:
            assert "b_fuzzed" in str(e)  # the message names the bad file
            return None
    assert isinstance(ds, ImageDataset) and ds.train.shape[-2:] == (8, 8)
    assert 0 <= float(ds.train.min()) and float(ds.train.max()) <= 1
    return ds


@PROPERTY
@given(content=st.binary(max_size=400) | st.binary(max_size=400).map(lambda b: VALID["png"][:8] + b),
       suffix=st.sampled_from([".png", ".jpg", ".jpeg"]))
def test_random_bytes_as_images_are_refused(content, suffix):
    assert _load_folder_with(content, suffix) is None


@PROPERTY
@given(kind=st.sampled_from(sorted(VALID)), cut_at=st.floats(0, 1, exclude_max=True),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=3))
def test_truncated_or_flipped_images_fail_cleanly(kind, cut_at, flips):
    data = bytearray(VALID[kind][: max(1, int(cut_at * len(VALID[kind])))] if cut_at > 0 else VALID[kind])
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    _load_folder_with(bytes(data), ".jpg" if kind == "jpg" else ".png")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_decompression_bomb_header_is_refused(tmp_path):
    """A 100-byte PNG that claims 40000 x 40000 pixels must not make us allocate 1.6 GB."""
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + _png_chunk(b"IEND", b"")
    (tmp_path / "a.png").write_bytes(VALID["png"])
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(GenbenchError, match="bomb.png: cannot decode image"):
        load_dataset("folder", data_dir=tmp_path, image_size=8)


# ---------------------------------------------------------------- property: the config parser


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


def _config_dicts(cls):
    names = [f.name for f in fields(cls)]
    return st.dictionaries(st.sampled_from(names) | st.text(max_size=8), JSON, max_size=6)


@PROPERTY
@given(cls_and_data=st.sampled_from([TrainConfig, AEConfig, VAEConfig]).flatmap(
    lambda cls: st.tuples(st.just(cls), _config_dicts(cls))))
def test_random_config_values_give_genbench_errors(cls_and_data):
    cls, data = cls_and_data
    try:
        cfg = from_dict(cls, data)
    except GenbenchError:
        return
    assert isinstance(cfg, cls)  # accepted: then every field has its declared kind
    for f in fields(cls):
        value = getattr(cfg, f.name)
        if f.type in ("int", "float"):
            assert isinstance(value, (int, float)) and not isinstance(value, bool)


@PROPERTY
@given(items=st.lists(st.text(max_size=30) | st.builds(
    lambda k, v: f"{k}={v}", st.sampled_from(["lr", "train.lr", "latent_dim", "train.stages", "arch", "train",
                                              "train.stages.main.lr", "model.width", "seed"]),
    st.text(max_size=20) | JSON.map(json.dumps)), max_size=4))
def test_random_set_items_give_genbench_errors(items):
    try:
        model_cfg, train_cfg = resolve_configs("ae", "digits", (1, 8, 8), "quick", items)
    except GenbenchError:
        return
    assert isinstance(model_cfg, AEConfig) and isinstance(train_cfg, TrainConfig)


@PROPERTY
@given(content=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode())
       | _config_dicts(AEConfig).map(lambda v: json.dumps(v).encode()))
def test_random_bytes_as_json_config(content, tmp_path):
    """Any bytes read as a config: refused by read_json or from_dict with a message that says what is
    wrong, or accepted as a valid AEConfig."""
    path = tmp_path / "config.json"
    path.write_bytes(content)
    try:
        obj = read_json(path)
    except GenbenchError as e:
        assert str(e).startswith(f"{path}: ") and ("not valid JSON" in str(e) or "too deeply nested" in str(e))
        return
    if not isinstance(obj, dict):
        with pytest.raises(GenbenchError, match=rf"^AEConfig: expected a mapping of fields, got {type(obj).__name__}$"):
            from_dict(AEConfig, obj)
        return
    known = {f.name for f in fields(AEConfig)}
    unknown = sorted(set(obj) - known)
    if unknown:
        with pytest.raises(GenbenchError, match=rf"^AEConfig: unknown field\(s\) {re.escape(str(unknown))}; valid fields"):
            from_dict(AEConfig, obj)
        return
    try:
        cfg = from_dict(AEConfig, obj)
    except GenbenchError as e:  # a known field with a wrong type or value: the message names it
        assert any(str(e).startswith(f"AEConfig.{k}: ") or f"ae config: {k} must be" in str(e) for k in obj), str(e)
        return
    assert isinstance(cfg, AEConfig) and all(getattr(cfg, k) == v for k, v in obj.items())


@pytest.mark.parametrize("text", ["[" * 100_000, '{"lr": 1' + "0" * 5000 + "}"])
def test_pathological_json_is_refused(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(GenbenchError):
        read_json(tmp_path / "config.json")


def test_integer_too_large_for_a_float_field_is_refused():
    with pytest.raises(GenbenchError):
        from_dict(TrainConfig, {"lr": 10**400})
