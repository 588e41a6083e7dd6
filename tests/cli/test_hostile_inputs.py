"""Issue #7: hostile inputs. Every bad input gets ONE clear error line (exit != 0, no traceback) and
nothing is lost or half-written.

Most cases run ``llavaq.cli.main`` in-process (validation happens before any calibration); the
"no traceback" promise, Typer usage errors and Ctrl-C are also checked in real subprocesses.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_guard import Run, cli
from PIL import Image
from safetensors.torch import load_file, save_file

from llavaq.calib.images import MAX_PIXELS, MAX_SIDE, load_image, load_images
from llavaq.testing import build_tiny_llava, write_test_images

WEIGHTS = "model.safetensors"
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------- helpers
def sub(*args, env=None, timeout=120) -> Run:
    p = subprocess.run([sys.executable, "-m", "llavaq", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=REPO, env=env)
    return Run(p.returncode, p.stdout, p.stderr)


def assert_error(res: Run, *needles: str, code: int | None = None) -> str:
    """Exit != 0, no traceback, exactly one ``error:`` line, it is the last line and names the problem."""
    assert res.code != 0, res.err
    if code is not None:
        assert res.code == code, (res.code, res.err)
    assert "Traceback" not in res.err and "Traceback" not in res.out, res.err
    errors = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.err
    assert res.error_line == errors[0], res.err  # nothing (no wrapped continuation) after it
    if os.environ.get("LLAVAQ_PRINT_ERRORS"):  # to refresh the README Troubleshooting section
        print("\nMSG", errors[0], file=sys.__stderr__)
    low = errors[0].lower()
    for n in needles:
        assert str(n).lower() in low, (n, errors[0])
    return errors[0]


def assert_no_output(save: Path, before: dict[str, bytes] | None = None) -> None:
    """The save directory is absent (or byte-identical to ``before``), with no temp/backup sibling."""
    if before is None:
        assert not save.exists(), sorted(save.iterdir())
    else:
        assert snapshot(save) == before
    assert not list(save.parent.glob(f".{save.name}.llavaq-*")), list(save.parent.iterdir())
    assert not [p for p in save.parent.rglob("*") if ".llavaq-tmp-" in p.name or ".tmp" in p.name]


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(model: Path, edit) -> None:
    f = model / WEIGHTS
    sd = load_file(str(f))
    edit(sd)
    f.unlink()
    save_file(sd, str(f), metadata={"format": "pt"})


@pytest.fixture
def io_dirs(tmp_path):
    cache = tmp_path / "cache"
    save = tmp_path / "saves" / "out"
    save.parent.mkdir()
    return cache, save


def quantize_args(model, images, save, cache, *extra):
    return ("quantize", "--model_path", model, "--calib_images", images, "--save_directory", save,
            "--device_type", "cpu", "--cache_dir", cache, *extra)


# --------------------------------------------------------------------------------------------- model_path
def _plain_llama(m: Path) -> None:
    from transformers import LlamaConfig

    (m / "config.json").write_text(json.dumps(LlamaConfig(num_hidden_layers=1).to_dict()))


def _clip(m: Path) -> None:
    from transformers import CLIPConfig

    (m / "config.json").write_text(json.dumps(CLIPConfig().to_dict()))


def _truncate(m: Path) -> None:
    f = m / WEIGHTS
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _corrupt_header(m: Path) -> None:
    f = m / WEIGHTS
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00\xff garbage garbage garbage \xfe\x01"[:32].ljust(32, b"#")
    f.write_bytes(bytes(data))


def _drop_tensor(m: Path) -> None:
    rewrite_weights(m, lambda sd: sd.pop("language_model.model.layers.1.self_attn.k_proj.weight"))


def _wrong_shape(m: Path) -> None:
    def edit(sd):
        n = "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
        sd[n] = sd[n][:-1].clone()

    rewrite_weights(m, edit)


def _poison(name: str, value: float):
    def mutate(m: Path) -> None:
        def edit(sd):
            t = sd[name].clone()
            t.view(-1)[7] = value
            sd[name] = t

        rewrite_weights(m, edit)

    return mutate


def _only_bin(m: Path) -> None:
    (m / WEIGHTS).unlink()
    (m / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not unpickled by llavaq")


def _auto_map(m: Path) -> None:
    cfg = json.loads((m / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLlava"}
    (m / "config.json").write_text(json.dumps(cfg))


def _rm(name: str):
    return lambda m: (m / name).unlink()


def _write(name: str, text: str):
    return lambda m: (m / name).write_text(text)


FC1 = "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
QPROJ = "language_model.model.layers.0.self_attn.q_proj.weight"

MODEL_CASES = {
    # id: (mutation of a copy of the tiny model, substrings the error line must contain)
    "config_missing": (_rm("config.json"), ["config.json", "missing"]),
    "config_invalid_json": (_write("config.json", "{ not json"), ["config.json", "invalid json"]),
    "config_plain_llama": (_plain_llama, ["config.json", "'llama'", "not a llava"]),
    "config_clip": (_clip, ["config.json", "'clip'", "not a llava"]),
    "safetensors_truncated": (_truncate, [WEIGHTS, "truncated"]),
    "safetensors_header_corrupted": (_corrupt_header, [WEIGHTS, "corrupted safetensors header"]),
    "tensor_missing": (_drop_tensor, ["layers.1.self_attn.k_proj.weight", "missing"]),
    "tensor_wrong_shape": (_wrong_shape, [FC1, "shape", "[95, 48]", "[96, 48]"]),
    "weights_nan": (_poison(FC1, float("nan")), [WEIGHTS, FC1, "nan"]),
    "weights_inf": (_poison(QPROJ, float("inf")), [WEIGHTS, QPROJ, "inf"]),
    "only_pickle_bin": (_only_bin, ["pytorch_model.bin", "pickle", "safetensors", "save_pretrained"]),
    "needs_remote_code": (_auto_map, ["config.json", "auto_map", "--trust_remote_code"]),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model(case, tiny_model, calib_dir, io_dirs, tmp_path, capsys):
    mutate, needles = MODEL_CASES[case]
    model = copy_model(tiny_model, tmp_path / "model")
    mutate(model)
    cache, save = io_dirs
    res = cli(capsys, *quantize_args(model, calib_dir, save, cache))
    line = assert_error(res, *needles, code=2)
    assert str(model) in line or case == "tensor_missing"  # names the directory/file
    assert_no_output(save)


@pytest.mark.parametrize("case", ["missing", "a_file", "empty_dir"])
def test_bad_model_path(case, calib_dir, io_dirs, tmp_path, capsys):
    model = tmp_path / "model"
    if case == "a_file":
        model.write_text("hello")
    elif case == "empty_dir":
        model.mkdir()
    cache, save = io_dirs
    res = cli(capsys, *quantize_args(model, calib_dir, save, cache))
    want = {"missing": "does not exist", "a_file": "is a file", "empty_dir": "is empty"}[case]
    assert_error(res, str(model), want, code=2)
    assert_no_output(save)
    assert not cache.exists()  # nothing calibrated


def test_weights_nan_found_in_export_without_cache_reuse(tiny_model, tmp_path):
    """The finite check sits in Checkpoint.tensor: any reader (export included) names the tensor."""
    from llavaq.errors import ModelError
    from llavaq.model.checkpoint import Checkpoint

    model = copy_model(tiny_model, tmp_path / "model")
    _poison(QPROJ, float("-inf"))(model)
    ck = Checkpoint(model)
    with pytest.raises(ModelError, match="q_proj.weight.*NaN/Inf"):
        ck.tensor(QPROJ, torch.float32)
    assert torch.isfinite(ck.tensor(FC1)).all()  # the others still load


# --------------------------------------------------------------------------------------------- images
def _rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _bomb_png(path: Path, w: int = 12000, h: int = 12000) -> None:
    """A PNG whose header claims w x h (8-bit gray) with only a sliver of data: no 144 MP allocation."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (w + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _exif_rotated(path: Path) -> None:
    """Stored landscape 40x20 (left half red, right half blue) with EXIF orientation 6 (rotate 90° CW)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, exif=exif, quality=95)


def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    _rgb(64, 64).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _palette_transparent(path: Path) -> None:
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    im.paste(1, (0, 0, 4, 8))
    im.save(path, transparency=0)  # index 0 (right half) is transparent


def _rgba(path: Path) -> None:
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[:, :4] = (10, 200, 10, 255)
    arr[:, 4:] = (10, 200, 10, 0)  # fully transparent
    Image.fromarray(arr, "RGBA").save(path)


def _gray16(path: Path) -> None:
    Image.fromarray(np.array([[0, 32768, 65535] * 3] * 9, np.uint16)).save(path)


# Files the loader must accept: (writer, check of the loaded upright 8-bit RGB image)
GOOD_IMAGES = {
    "cmyk.jpg": (lambda p: Image.new("CMYK", (16, 12), (0, 255, 255, 0)).save(p, "JPEG", quality=95),
                 lambda im: im.size == (16, 12) and np.asarray(im)[6, 8, 0] > 200 and np.asarray(im)[6, 8, 1] < 60),
    "gray16.png": (_gray16, lambda im: np.asarray(im)[0, :3, 0].tolist() == [0, 128, 255]),
    "gray.png": (lambda p: Image.new("L", (10, 10), 77).save(p),
                 lambda im: np.asarray(im)[0, 0].tolist() == [77, 77, 77]),
    "palette_transparent.png": (_palette_transparent,
                                lambda im: np.asarray(im)[0, 0].tolist() == [200, 10, 10]
                                and np.asarray(im)[0, 7].tolist() == [255, 255, 255]),
    "rgba.png": (_rgba, lambda im: np.asarray(im)[0, 0].tolist() == [10, 200, 10]
                 and np.asarray(im)[0, 7].tolist() == [255, 255, 255]),
    "exif_rotated.jpg": (_exif_rotated,
                         lambda im: im.size == (20, 40)  # portrait after rotation
                         # red on top, blue at the bottom
                         and np.asarray(im)[5, 10, 0] > 200 and np.asarray(im)[35, 10, 2] > 200),
    "small_8x8.png": (lambda p: Image.new("RGB", (8, 8), (1, 2, 3)).save(p),
                      lambda im: im.size == (8, 8) and np.asarray(im)[0, 0].tolist() == [1, 2, 3]),
}

# Files the loader must refuse: (writer, substring of the reason)
BAD_IMAGES = {
    "zero_bytes.jpg": (lambda p: p.write_bytes(b""), "empty file"),
    "truncated.jpg": (_truncated_jpeg, "truncated"),
    "text.png": (lambda p: p.write_text("this is not a picture\n"), "not an image"),
    "bomb.png": (_bomb_png, "12000x12000 pixels is too large"),
    "one_pixel.png": (lambda p: Image.new("RGB", (1, 1)).save(p), "1x1 pixels is too small"),
}


@pytest.mark.parametrize("name", list(GOOD_IMAGES))
def test_odd_but_valid_image_loads_upright_rgb(name, tmp_path):
    write, check = GOOD_IMAGES[name]
    write(tmp_path / name)
    im = load_image(tmp_path / name)
    assert im.mode == "RGB"
    assert check(im), (im.size, np.asarray(im)[:2, :8].tolist())


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_unreadable_image_reason(name, tmp_path):
    from llavaq.errors import ImageError

    write, why = BAD_IMAGES[name]
    write(tmp_path / name)
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / name)
    assert why in e.value.message and name in e.value.message


# --image_loading msmodelslim: upstream's pixels (as decoded, then convert("RGB")): no EXIF transpose, alpha dropped
MSMODELSLIM_LOADED = {
    "rgba.png": lambda im: np.asarray(im)[0, 7].tolist() == [10, 200, 10],  # the transparent half keeps its RGB
    "exif_rotated.jpg": lambda im: im.size == (40, 20),  # stored landscape, not turned upright
    "palette_transparent.png": lambda im: np.asarray(im)[0, 0].tolist() == [200, 10, 10],
    "gray.png": lambda im: np.asarray(im)[0, 0].tolist() == [77, 77, 77],
}


@pytest.mark.parametrize("name", list(GOOD_IMAGES))
def test_msmodelslim_loading_is_upstreams_convert_rgb(name, tmp_path):
    write, _ = GOOD_IMAGES[name]
    write(tmp_path / name)
    im = load_image(tmp_path / name, "msmodelslim")
    with Image.open(tmp_path / name) as raw:
        upstream = raw.convert("RGB") if raw.mode != "RGB" else raw.copy()
    assert im.mode == "RGB" and im.size == upstream.size and im.tobytes() == upstream.tobytes()
    if name in MSMODELSLIM_LOADED:
        assert MSMODELSLIM_LOADED[name](im), np.asarray(im)[:2, :8].tolist()


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_msmodelslim_loading_keeps_the_guards(name, tmp_path):
    """Size limits, bomb guard, empty/truncated/non-image files: the same one-line reasons in both modes."""
    from llavaq.errors import ImageError

    write, why = BAD_IMAGES[name]
    write(tmp_path / name)
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / name, "msmodelslim")
    assert why in e.value.message and name in e.value.message


def test_image_loading_keys_the_cache_only_when_set(hostile_images):
    from llavaq.errors import LlavaqError
    from llavaq.recipe import QuantRecipe

    assert "image_loading" not in QuantRecipe().calibration_dict()  # default recipes keep their cache keys
    assert QuantRecipe().calibration_key() == "7817ec99020e385c"  # the key before --image_loading existed
    mm = QuantRecipe(image_loading="msmodelslim")
    assert mm.calibration_dict()["image_loading"] == "msmodelslim" and mm.calibration_key() != "7817ec99020e385c"
    assert QuantRecipe.from_dict(mm.to_dict()) == mm
    with pytest.raises(LlavaqError, match="--image_loading must be one of upright, msmodelslim"):
        QuantRecipe(image_loading="sideways")
    # the EXIF/alpha photos give other pixels, so other calibration inputs
    up, ms = load_images(hostile_images), load_images(hostile_images, mode="msmodelslim")
    assert [p.name for p in up.paths] == [p.name for p in ms.paths] and up.digest() != ms.digest()


def test_bomb_limits_documented():
    # 12000 x 12000 = 144 MP: above our refusal limit and above PIL's warning threshold (89.5 MP) but
    # below PIL's hard error (179 MP); we refuse at 64 MP and downscale anything wider than 4096 px.
    assert MAX_PIXELS < 12000 * 12000 < 2 * Image.MAX_IMAGE_PIXELS
    assert MAX_SIDE == 4096


def test_large_image_is_downscaled(tmp_path):
    Image.new("RGB", (MAX_SIDE * 2, 64), (9, 9, 9)).save(tmp_path / "wide.png")
    assert load_image(tmp_path / "wide.png").size == (MAX_SIDE, 32)


@pytest.fixture(scope="module")
def hostile_images(tmp_path_factory):
    """A folder with every odd-but-valid image, every unreadable file, a symlink loop and a sub-folder."""
    d = tmp_path_factory.mktemp("hostile_images")
    for name, (write, _) in {**GOOD_IMAGES, **BAD_IMAGES}.items():
        write(d / name)
    os.symlink("loop", d / "loop")
    (d / "nested").mkdir()
    _rgb(30, 30).save(d / "nested" / "inner.png")
    return d


def test_loader_folder_semantics(hostile_images):
    loaded = load_images(hostile_images)
    assert [p.name for p in loaded.paths] == sorted(GOOD_IMAGES)  # sub-folders ignored, sorted by name
    assert sorted(p.name for p, _ in loaded.skipped) == sorted([*BAD_IMAGES, "loop"])
    assert dict((p.name, r) for p, r in loaded.skipped)["loop"].startswith("broken or looping symlink")


def test_hostile_image_folder_quantizes_with_one_summary_line(tiny_model, hostile_images, io_dirs, capsys):
    cache, save = io_dirs
    res = cli(capsys, *quantize_args(tiny_model, hostile_images, save, cache))
    assert res.code == 0, res.err
    assert "Traceback" not in res.err
    lines = [ln for ln in res.err.splitlines() if "unreadable" in ln]
    assert len(lines) == 1, res.err
    for name in [*BAD_IMAGES, "loop"]:
        assert name in lines[0]
    assert str(hostile_images) in lines[0]
    assert f"{len(GOOD_IMAGES)} image(s) used" in res.err
    assert (save / "quant_model_weight_w8a8.safetensors").is_file()
    manifest = json.loads(next(cache.glob("*/manifest.json")).read_text())
    assert manifest["calibration"]["images"] == sorted(GOOD_IMAGES)


@pytest.mark.parametrize("case", ["missing", "a_file", "empty", "only_non_images", "only_unreadable",
                                  "only_subfolders"])
def test_no_usable_images(case, tiny_model, io_dirs, tmp_path, capsys):
    d = tmp_path / "imgs"
    needles = [str(d)]
    if case == "missing":
        needles.append("does not exist")
    elif case == "a_file":
        d.write_text("x")
        needles.append("not a directory")
    else:
        d.mkdir()
        if case == "empty":
            needles.append("no image files")
        elif case == "only_non_images":
            (d / "notes.txt").write_text("hello")
            (d / "data.json").write_text("{}")
            needles += ["no usable images", "notes.txt: not an image"]
        elif case == "only_unreadable":
            for name, (write, _) in BAD_IMAGES.items():
                write(d / name)
            needles += ["no usable images", "5 unreadable", "zero_bytes.jpg: empty file"]
        else:
            (d / "sub").mkdir()
            _rgb(20, 20).save(d / "sub" / "a.png")
            needles += ["no image files", "sub-folders are not searched"]
    cache, save = io_dirs
    res = cli(capsys, *quantize_args(tiny_model, d, save, cache))
    assert_error(res, *needles, code=2)
    assert_no_output(save)


# --------------------------------------------------------------------------------------------- save_directory
def test_save_dir_not_writable_chmod(tiny_model, calib_dir, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 0o500 does not stop root's writes (test_save_dir_under_a_file "
                    "covers an unwritable save path)")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        res = cli(capsys, *quantize_args(tiny_model, calib_dir, parent / "out", tmp_path / "cache"))
        assert_error(res, str(parent), "not writable", code=2)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o700)


def test_save_dir_under_a_file(tiny_model, calib_dir, tmp_path, capsys):
    """Unwritable even for root: the parent 'directory' is a regular file."""
    f = tmp_path / "afile"
    f.write_text("x")
    save = f / "out"
    res = cli(capsys, *quantize_args(tiny_model, calib_dir, save, tmp_path / "cache"))
    assert_error(res, str(f), "not a directory", code=2)
    assert f.read_text() == "x"
    assert not (tmp_path / "cache").exists()  # refused before calibrating


def test_save_dir_is_a_file(tiny_model, calib_dir, tmp_path, capsys):
    save = tmp_path / "out"
    save.write_text("precious")
    res = cli(capsys, *quantize_args(tiny_model, calib_dir, save, tmp_path / "cache"))
    assert_error(res, str(save), "is a file", code=2)
    assert save.read_text() == "precious"


def export_args(model, cache, save, *extra):
    return ("export", "--model_path", model, "--cache", cache, "--save_directory", save, *extra)


def test_save_dir_non_empty_refused_then_overwritten(tiny_model, full_cache, io_dirs, capsys):
    _, save = io_dirs
    save.mkdir()
    (save / "old.txt").write_text("old")
    before = snapshot(save)
    res = cli(capsys, *export_args(tiny_model, full_cache, save))
    assert_error(res, str(save), "not empty", "--overwrite", code=2)
    assert_no_output(save, before)
    res = cli(capsys, *export_args(tiny_model, full_cache, save, "--overwrite"))
    assert res.code == 0, res.err
    assert not (save / "old.txt").exists()
    assert (save / "quant_model_weight_w8a8.safetensors").is_file()
    assert not list(save.parent.glob(".out.llavaq-*"))


@pytest.mark.parametrize("existing", [False, True], ids=["new_dir", "overwrite_existing"])
def test_disk_full_mid_write(existing, tiny_model, full_cache, io_dirs, capsys, monkeypatch):
    import llavaq.formats.sharding as sharding

    _, save = io_dirs
    before = None
    if existing:
        save.mkdir()
        (save / "quant_model_weight_w8a8.safetensors").write_bytes(b"previous model")
        (save / "config.json").write_text("{}")
        before = snapshot(save)
    written: list[str] = []
    real = sharding.open_shard

    def open_shard(path, metadata, specs, label):
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        written.append(path)
        return real(path, metadata, specs, label)

    monkeypatch.setattr(sharding, "open_shard", open_shard)
    args = export_args(tiny_model, full_cache, save, "--part_file_size", "0.00005")
    res = cli(capsys, *args, *(["--overwrite"] if existing else []))
    line = assert_error(res, "no space left", f"{save}/quant_model_weight_w8a8 shard 2",
                        "unchanged" if existing else "not created", code=2)
    assert ".llavaq-tmp-" not in line  # names the user's file, not our temp dir
    assert len(written) == 1  # the first shard was written before the disk "filled"
    assert_no_output(save, before)
    monkeypatch.setattr(sharding, "open_shard", real)
    res = cli(capsys, *args, "--overwrite")  # after freeing space the same command succeeds
    assert res.code == 0, res.err
    assert len(list(save.glob("quant_model_weight_w8a8-000*-of-*.safetensors"))) >= 2


# --------------------------------------------------------------------------------------------- flags
FLAG_CASES = {
    "w4a8": (["--w_bit", "4"], ["--w_bit 4 --a_bit 8", "no output format carries it"]),
    "w_bit_3": (["--w_bit", "3", "--a_bit", "16"], ["--w_bit 3 --a_bit 16", "W4A16"]),
    "group_size_w8a8": (["--group_size", "128"], ["per-channel and symmetric", "--a_bit 16"]),
    "w_sym_maybe": (["--w_sym", "maybe", "--a_bit", "16"], ["--w_sym", "'maybe'"]),
    "m1_weight_only": (["--a_bit", "16", "--anti_outlier", "m1"], ["nothing to smooth"]),
    "part_file_size_zero": (["--part_file_size", "0"], ["--part_file_size", "positive"]),
    "part_file_size_negative": (["--part_file_size", "-2"], ["--part_file_size", "positive", "-2"]),
    "unknown_device": (["--device_type", "tpu"], ["unknown --device_type 'tpu'", "cpu, cuda, npu"]),
    "npu_without_torch_npu": (["--device_type", "npu"], ["torch_npu", "cann", "llavaq[npu]"]),
    "cuda_without_cuda": (["--device_type", "cuda"], ["cuda is not available"]),
    "trust_remote_code_maybe": (["--trust_remote_code", "maybe"], ["--trust_remote_code", "'maybe'"]),
    "unknown_format": (["--format", "onnx"], ["unknown format 'onnx'", "msmodelslim"]),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flag(case, tiny_model, calib_dir, io_dirs, capsys):
    flags, needles = FLAG_CASES[case]
    if case == "npu_without_torch_npu":
        pytest.importorskip("pytest")  # always available; the real guard is below
        try:
            import torch_npu  # noqa: F401
            pytest.skip("torch_npu is installed")
        except ImportError:
            pass
    if case == "cuda_without_cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    cache, save = io_dirs
    args = list(quantize_args(tiny_model, calib_dir, save, cache))
    if "--device_type" in flags:
        i = args.index("--device_type")
        del args[i:i + 2]
    res = cli(capsys, *args, *flags)
    assert_error(res, *needles, code=2)
    assert_no_output(save)
    assert not cache.exists()  # refused before any calibration


# --------------------------------------------------------------------------------------------- cache
def _garbage_stage(c: Path) -> None:
    f = sorted(c.glob("stage-*.safetensors"))[0]
    f.write_bytes(os.urandom(64) + f.read_bytes()[64:])


def _garbage_manifest(c: Path) -> None:
    (c / "manifest.json").write_text('{"format": "llavaq-session-cache", "ver')


def _old_version(c: Path) -> None:
    m = json.loads((c / "manifest.json").read_text())
    m["version"] = 0
    m["llavaq_version"] = "0.0.1"
    (c / "manifest.json").write_text(json.dumps(m))


def _missing_stage(c: Path) -> None:
    (c / "stage-text_layer.1.safetensors").unlink()


CACHE_CASES = {
    "stage_garbage": (_garbage_stage, ["stage-", "corrupted", "calibrate"]),
    "manifest_invalid_json": (_garbage_manifest, ["manifest.json", "corrupted", "calibrate"]),
    "older_llavaq": (_old_version, ["manifest.json", "version 0", "0.0.1", "delete", "calibrate"]),
    "stage_missing": (_missing_stage, ["stage-text_layer.1.safetensors is missing", "delete", "calibrate"]),
    "not_a_cache": (lambda c: (c / "manifest.json").unlink(), ["not a llavaq session cache"]),
}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_bad_cache(case, tiny_model, full_cache, io_dirs, capsys):
    mutate, needles = CACHE_CASES[case]
    mutate(full_cache)
    _, save = io_dirs
    res = cli(capsys, *export_args(tiny_model, full_cache, save))
    assert_error(res, str(full_cache), *needles, code=2)
    assert_no_output(save)


def test_cache_from_another_model(tiny_model_mha, full_cache, io_dirs, capsys):
    _, save = io_dirs
    res = cli(capsys, *export_args(tiny_model_mha, full_cache, save))
    assert_error(res, str(full_cache), "another model", str(tiny_model_mha), "run calibrate", code=2)
    assert_no_output(save)


@pytest.mark.parametrize("case", ["manifest_invalid_json", "older_llavaq"])
def test_bad_cache_on_quantize_then_follow_the_advice(case, tiny_model, calib_dir, full_cache, io_dirs, capsys):
    """quantize reuses the matching cache; if it is unusable the error says what to delete, and doing so works."""
    CACHE_CASES[case][0](full_cache)
    _, save = io_dirs
    args = quantize_args(tiny_model, calib_dir, save, full_cache.parent)
    res = cli(capsys, *args)
    assert_error(res, str(full_cache / "manifest.json"), f"delete {full_cache} and run calibrate again", code=2)
    assert_no_output(save)
    shutil.rmtree(full_cache)
    assert cli(capsys, *args).code == 0


# --------------------------------------------------------------------------------------------- unexpected / usage
def test_unexpected_exception_is_one_line(tiny_model, full_cache, io_dirs, capsys, monkeypatch):
    import llavaq.pipeline.exporting

    def boom(*a, **k):
        raise RuntimeError("something odd\nsecond line")

    monkeypatch.setattr(llavaq.pipeline.exporting, "iter_quantized_tensors", boom)
    _, save = io_dirs
    res = cli(capsys, *export_args(tiny_model, full_cache, save))
    assert_error(res, "RuntimeError: something odd", "LLAVAQ_DEBUG=1", code=1)
    assert "second line" not in res.err
    assert_no_output(save)


def test_interrupt_during_export(tiny_model, full_cache, io_dirs, capsys, monkeypatch):
    """Ctrl-C while shards are written: exit 130, nothing half-written, the same command then succeeds."""
    import llavaq.formats.sharding as sharding

    _, save = io_dirs
    real = sharding.open_shard
    calls = []

    def open_shard(path, metadata, specs, label):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what SIGINT's default handler raises, here mid-export
        return real(path, metadata, specs, label)

    monkeypatch.setattr(sharding, "open_shard", open_shard)
    args = export_args(tiny_model, full_cache, save, "--part_file_size", "0.00005")
    res = cli(capsys, *args)
    assert res.code == 130 and "Traceback" not in res.err
    assert "interrupted" in res.error_line and "again" in res.error_line
    assert_no_output(save)
    assert cli(capsys, *args).code == 0


def test_usage_errors_subprocess(tmp_path):
    """Real processes: a missing required option exits 2 with click's usage message, no traceback;
    a bad model path is one error line."""
    res = sub("quantize", "--save_directory", tmp_path / "out")
    assert res.code == 2, res.err
    assert "Traceback" not in res.err and "--model_path" in res.err
    res = sub("quantize", "--model_path", tmp_path / "nope", "--save_directory", tmp_path / "out",
              "--device_type", "cpu")
    assert_error(res, "does not exist", str(tmp_path / "nope"), code=2)
    res = sub("frobnicate")
    assert res.code == 2 and "Traceback" not in res.err


# --------------------------------------------------------------------------------------------- Ctrl-C in calibration
@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """Enough layers that calibration takes a few seconds: room to press Ctrl-C mid-way."""
    return build_tiny_llava(tmp_path_factory.mktemp("deep"), vision_layers=6, text_layers=16, seed=3)


def test_sigint_during_calibration_resumes_to_same_result(deep_model, tmp_path):
    from llavaq import api

    images = write_test_images(tmp_path / "imgs", sizes=[(64, 48), (40, 56), (33, 33), (50, 50), (60, 40), (45, 45)])
    cache, save = tmp_path / "cache", tmp_path / "saves" / "out"
    save.parent.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "llavaq", *quantize_args(deep_model, images, save, cache)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    done: list[str] = []
    while time.monotonic() < deadline and p.poll() is None:
        mf = list(cache.glob("*/manifest.json"))
        if mf:
            try:
                done = json.loads(mf[0].read_text())["stages_done"]
            except (json.JSONDecodeError, OSError):  # pragma: no cover - atomic writes make this unlikely
                done = []
            if done:
                break
        time.sleep(0.02)
    assert done and p.poll() is None, "calibration finished before it could be interrupted"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last.startswith("interrupted:") and "run the same command again to resume" in last
    assert_no_output(save)
    (session,) = cache.iterdir()
    manifest = json.loads((session / "manifest.json").read_text())
    assert not manifest["complete"] and 1 <= len(manifest["stages_done"]) < 6 + 1 + 16
    for st in manifest["stages_done"]:
        assert load_file(str(session / f"stage-{st}.safetensors"))  # every recorded stage is readable
    assert not [f for f in session.iterdir() if f.name.startswith(".")]  # no temp files left

    # resume (same command) and compare with an uninterrupted run on a fresh cache
    cal, res = api.quantize(deep_model, images, save, cache_dir=cache, device_type="cpu")
    assert not cal.reused and cal.cache.path == session
    ref_cal, ref = api.quantize(deep_model, images, tmp_path / "ref", cache_dir=tmp_path / "cache_ref",
                                device_type="cpu")
    got = load_file(str(save / "quant_model_weight_w8a8.safetensors"))
    want = load_file(str(tmp_path / "ref" / "quant_model_weight_w8a8.safetensors"))
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_cli_image_loading_flag(tiny_model, io_dirs, tmp_path, capsys):
    """--image_loading on calibrate and quantize: recorded in llavaq_record.json, its own session cache; a bad
    value is a one-line error."""
    cache, save = io_dirs
    photos = tmp_path / "photos"
    photos.mkdir()
    _rgb(40, 30).save(photos / "a.png")
    _rgba(photos / "b_alpha.png")
    _exif_rotated(photos / "c_exif.jpg")
    res = cli(capsys, *quantize_args(tiny_model, photos, save, cache, "--image_loading", "msmodelslim"))
    assert res.code == 0, res.err
    rec = json.loads((save / "llavaq_record.json").read_text())
    assert rec["recipe"]["image_loading"] == "msmodelslim"
    cal = cli(capsys, "calibrate", "--model_path", tiny_model, "--calib_images", photos, "--cache_dir", cache,
              "--device_type", "cpu")
    assert cal.code == 0, cal.err
    sessions = sorted(p.name for p in cache.iterdir())
    assert len(sessions) == 2  # upright and msmodelslim calibrate different pixels: two sessions
    again = cli(capsys, "calibrate", "--model_path", tiny_model, "--calib_images", photos, "--cache_dir", cache,
                "--device_type", "cpu", "--image_loading", "msmodelslim")
    assert again.code == 0 and "reused cached calibration" in again.err
    bad = cli(capsys, *quantize_args(tiny_model, photos, tmp_path / "x", cache, "--image_loading", "sideways"))
    assert bad.code == 2 and bad.err.strip().splitlines() == [
        "error: --image_loading must be one of upright, msmodelslim, not 'sideways'"]
