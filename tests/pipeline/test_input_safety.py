"""Issue 24: inputs are sacred (no save/cache directory is, contains or lies inside an input; the final move never
deletes what llavaq did not create), one writer at a time, leftovers of killed runs removed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hostile_guard import cli, guard, one_error  # noqa: F401  (guard is a fixture)

from llavaq.errors import LlavaqError, OutputError
from llavaq.formats.base import AtomicOutputDir

REPO = Path(__file__).resolve().parents[2]


def _quantize(model, photos, save, cache, *extra):
    return ("quantize", "--model_path", model, "--calib_images", photos, "--save_directory", save,
            "--device_type", "cpu", "--cache_dir", cache, *extra)


SAVE_CASES = {
    "is_model": lambda t, m, p: m,
    "inside_model": lambda t, m, p: m / "out",
    "contains_model": lambda t, m, p: t,
    "is_photos": lambda t, m, p: p,
    "is_cache": lambda t, m, p: t / "cache",
    "symlink_to_model": lambda t, m, p: (t / "link").symlink_to(m) or t / "link",
    "inside_symlinked_model": lambda t, m, p: (t / "link").symlink_to(m) or t / "link" / "sub",
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_directory_never_an_input(case, overwrite, model, photos, tmp_path, guard, capsys):  # noqa: F811
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "keep.txt").write_text("cache")
    guard.watch(model, photos, tmp_path / "cache")
    save = SAVE_CASES[case](tmp_path, model, photos)
    res = cli(capsys, *_quantize(model, photos, save, tmp_path / "cache", *(["--overwrite"] if overwrite else [])))
    line = one_error(res, "save directory", "never writes into, over or around an input")
    assert any(w in line for w in (" is the ", " lies inside the ", " contains the ")), line


def test_save_directory_never_the_prompt_file_or_its_folder(model, photos, tmp_path, guard, capsys):  # noqa: F811
    prompts = tmp_path / "prompts" / "p.txt"
    prompts.parent.mkdir()
    prompts.write_text("Describe the weather.\n")
    guard.watch(model, photos, prompts.parent)
    res = cli(capsys, *_quantize(model, photos, prompts.parent, tmp_path / "c", "--text_prompts", prompts,
                                 "--overwrite"))
    one_error(res, "contains the prompt file")


def test_export_never_into_the_session_cache(model, full_cache, guard, capsys):  # noqa: F811
    guard.watch(model, full_cache)
    for save in (full_cache, full_cache.parent, full_cache / "out"):
        res = cli(capsys, "export", "--model_path", model, "--cache", full_cache, "--save_directory", save,
                  "--overwrite")
        one_error(res, "session cache")


@pytest.mark.parametrize("case", ["is_model", "inside_model", "is_photos"])
def test_cache_directory_never_an_input(case, model, photos, tmp_path, guard, capsys):  # noqa: F811
    guard.watch(model, photos)
    cache = {"is_model": model, "inside_model": model / "cache", "is_photos": photos}[case]
    res = cli(capsys, "calibrate", "--model_path", model, "--calib_images", photos, "--cache_dir", cache,
              "--device_type", "cpu")
    one_error(res, "cache directory", "--cache_dir")


# ------------------------------------------------------------------------------------------- the final move
@pytest.fixture(params=[True, False], ids=["renameat2", "fallback"])
def mover(request, monkeypatch):
    if not request.param:
        import llavaq.safety as safety

        monkeypatch.setattr(safety, "_renameat2", lambda *a: False)
    return request.param


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


def test_target_appearing_meanwhile_is_kept(mover, tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputError, match="created or changed by someone else"):
        with AtomicOutputDir(target) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new")
            target.mkdir()
            (target / "mine.txt").write_text("user data")
    assert (target / "mine.txt").read_text() == "user data"
    assert sorted(p.name for p in target.iterdir()) == ["mine.txt"]
    assert _siblings(target) == []


def test_empty_target_filled_meanwhile_is_kept(mover, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(OutputError, match="created or changed"):
        with AtomicOutputDir(target) as tmp:
            (tmp / "a").write_bytes(b"new")
            (target / "mine.txt").write_text("user data")
    assert sorted(p.name for p in target.iterdir()) == ["mine.txt"] and _siblings(target) == []


def test_overwritten_target_replaced_meanwhile_is_kept(mover, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old output")
    with pytest.raises(OutputError, match="created or changed"):
        with AtomicOutputDir(target, overwrite=True) as tmp:
            (tmp / "a").write_bytes(b"new")
            os.rename(target, tmp_path / "moved")
            target.mkdir()
            (target / "other.txt").write_text("someone else's")
    assert (target / "other.txt").read_text() == "someone else's"
    assert (tmp_path / "moved" / "old.txt").read_text() == "old output"


def test_overwrite_and_empty_target_still_work(mover, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old output")
    with AtomicOutputDir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"] and _siblings(target) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with AtomicOutputDir(empty) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (empty / "new.txt").read_text() == "new" and _siblings(empty) == ["out"]


# ------------------------------------------------------------------------------------- one writer at a time
def test_second_writer_in_process_refused(tmp_path):
    target = tmp_path / "out"
    with AtomicOutputDir(target):
        other = AtomicOutputDir(target)
        other.tmp = tmp_path / ".out.llavaq-tmp-x"
        # re-entrant in one process (quantize -> export): the same lock, no refusal
        with AtomicOutputDir(tmp_path / "other"):
            pass
    assert (target).is_dir() and not (tmp_path / ".out.llavaq-lock").exists()


def _hold_lock(target: Path) -> subprocess.Popen:
    code = ("import sys, time; from llavaq import locks\n"
            f"with locks.exclusive({str(target)!r}, 'x'):\n    print('ready', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_second_run_on_a_locked_save_directory_refused(model, full_cache, tmp_path, guard, capsys):  # noqa: F811
    save = tmp_path / "saves" / "out"
    save.parent.mkdir()
    guard.watch(model, full_cache)
    p = _hold_lock(save)
    try:
        res = cli(capsys, "export", "--model_path", model, "--cache", full_cache, "--save_directory", save)
        one_error(res, f"save directory {save} is in use by another llavaq run (pid {p.pid})")
        assert not save.exists()
    finally:
        p.kill()
        p.wait()
    res = cli(capsys, "export", "--model_path", model, "--cache", full_cache, "--save_directory", save)
    assert res.code == 0, res.err  # the kernel dropped the killed holder's lock
    assert not [n for n in os.listdir(save.parent) if n != "out"]


def test_locked_session_cache_refused(model, photos, quantized, tmp_path, guard, capsys):  # noqa: F811
    cal, _ = quantized
    cache_dir = tmp_path / "c"
    shutil.copytree(cal.cache.path, cache_dir / cal.cache.path.name)
    guard.watch(model, photos)
    p = _hold_lock(cache_dir / cal.cache.path.name)
    try:
        res = cli(capsys, "calibrate", "--model_path", model, "--calib_images", photos, "--cache_dir", cache_dir,
                  "--device_type", "cpu")
        one_error(res, "session cache", "in use by another llavaq run", f"pid {p.pid}")
    finally:
        p.kill()
        p.wait()


def test_leftovers_of_killed_runs_removed(model, full_cache, tmp_path, capsys):
    save = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.llavaq-tmp-{dead}-0badc0de"
    stale.mkdir()
    (stale / "quant_model_weight_w8a8-00001.safetensors").write_bytes(b"partial")
    alive = tmp_path / f".out.llavaq-tmp-{os.getpid()}-00000000"  # a live pid: not ours to remove
    alive.mkdir()
    foreign = tmp_path / ".other.llavaq-tmp-1-00000000"  # another target's
    foreign.mkdir()
    res = cli(capsys, "export", "--model_path", model, "--cache", full_cache, "--save_directory", save)
    assert res.code == 0, res.err
    assert not stale.exists() and alive.is_dir() and foreign.is_dir()


def test_busy_is_a_user_error():
    from llavaq.locks import Busy

    assert issubclass(Busy, LlavaqError)


# ------------------------------------------------------------------------------------------- flag values
FLAG_CASES = {
    "part_nan": (["--part_file_size", "nan"], "--part_file_size must be a positive, finite number"),
    "part_inf": (["--part_file_size", "inf"], "--part_file_size must be a positive, finite number"),
    "part_tiny": (["--part_file_size", "1e-300"], "--part_file_size must be a positive, finite number"),
    "stream_inf": (["--stream_memory_gb", "inf"], "--stream_memory_gb must be a finite number"),
    "stream_nan": (["--stream_memory_gb", "nan"], "--stream_memory_gb must be a finite number"),
    "keep_float_all": (["--keep_float", "1000000000"], "nothing would be quantized"),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_flag_values_validated_before_calibration(case, model, photos, tmp_path, guard, capsys):  # noqa: F811
    flags, needle = FLAG_CASES[case]
    guard.watch(model, photos)
    res = cli(capsys, *_quantize(model, photos, tmp_path / "out", tmp_path / "cache", *flags))
    one_error(res, needle)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_keep_float_everything_refused_by_export(model, full_cache, tmp_path, capsys):
    res = cli(capsys, "export", "--model_path", model, "--cache", full_cache, "--save_directory", tmp_path / "o",
              "--keep_float", "26")
    one_error(res, "--keep_float 26 keeps every one of the 26 quantizable Linears")
    res = cli(capsys, "export", "--model_path", model, "--cache", full_cache, "--save_directory", tmp_path / "o",
              "--keep_float", "25")  # the 26th is fused with one of the 25 (q/k/v or gate/up): kept float too
    one_error(res, "keep every quantizable Linear in float once each is kept with its fused group")
    res = cli(capsys, "export", "--model_path", model, "--cache", full_cache, "--save_directory", tmp_path / "o",
              "--keep_float", "10")
    assert res.code == 0, res.err


def test_recipe_and_api_validate_without_the_cli():
    from llavaq.recipe import QuantRecipe, check_part_file_size, check_stream_memory_gb

    for bad in (float("nan"), float("inf"), 1e-300, -1.0, 0.0):
        with pytest.raises(LlavaqError):
            check_part_file_size(bad)
    check_part_file_size(0.5)
    for bad in (float("nan"), float("inf"), -0.5):
        with pytest.raises(LlavaqError):
            check_stream_memory_gb(bad)
    check_stream_memory_gb(0.0)
    with pytest.raises(LlavaqError, match="integer"):
        QuantRecipe(keep_float=1e9)


# ------------------------------------------------------------------------------------- names and encodings
def test_non_utf8_photo_name_and_ascii_stdout(model, photos, tmp_path, guard):  # noqa: F811
    first = sorted(photos.iterdir())[0]
    os.rename(first, os.path.join(os.fsencode(photos), b"caf\xe9-\xff" + os.fsencode(first.suffix)))
    guard.watch(model, photos)
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "llavaq", *_quantize(model, photos, tmp_path / "out", tmp_path / "c")],
                       capture_output=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    assert b"Traceback" not in p.stderr
    p.stdout.decode("ascii")  # nothing but ASCII reached the ASCII stream
    assert (tmp_path / "out" / "quant_model_weight_w8a8.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ signals
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_like_ctrl_c(sig, tmp_path):
    import signal
    import time

    from llavaq.testing import build_tiny_llava, write_test_images

    model = build_tiny_llava(tmp_path / "deep", kv_heads=2, text_layers=12, vision_layers=6)
    photos = write_test_images(tmp_path / "imgs", sizes=[(64, 48), (40, 56), (50, 50), (60, 40)])
    save, cache = tmp_path / "saves" / "out", tmp_path / "cache"
    save.parent.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "llavaq", *_quantize(model, photos, save, cache)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None and not list(cache.glob("*/stage-*.safetensors")):
        time.sleep(0.02)
    assert p.poll() is None, "finished before the signal"
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + getattr(signal, sig), err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.strip()][-1].startswith("interrupted:")
    assert not save.exists() and os.listdir(save.parent) == []
    assert not [f for f in tmp_path.rglob("*") if ".tmp" in f.name or ".llavaq-" in f.name]
