"""The user's own data path: manifests from the command line, images checked before decoding (decompression
bombs, the pixel limit), image paths kept inside the manifest's folder / data_root, invalid UTF-8 counted,
and the validate command."""
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import PIL.Image
import PIL.ImageFile
import pytest
from absl import flags
from ml_collections import config_flags

from glmv_jax.config_schema import ConfigError, validate
from glmv_jax.data.pipeline import data_config, make_pipeline
from glmv_jax.data.records import BadRecordError
from glmv_jax.data.validate import main as validate_main
from glmv_jax.evaluation.evaluate import prompt_records

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "own_data"
CFG = dict(seq_len=96, batch_size=2, patch_budget=256, shuffle=False, num_epochs=1, read_threads=1)


def png_bomb(path, width, height):
    """A valid all-black 1-bit PNG of width x height pixels, a few hundred KB on disk (decoding it would
    allocate width * height bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = bytes(1 + (width + 7) // 8)                     # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row * 256) for _ in range(height // 256))
    idat += comp.compress(row * (height % 256)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def line(rid, image, text="<image>a picture"):
    return json.dumps({"id": rid, "images": [image], "text": text})


def write_lines(path, lines):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """root/ (img/ok.png, the bombs, a symlink out of root) and outside/secret.png next to it."""
    base = tmp_path_factory.mktemp("own")
    root, outside = base / "root", base / "outside"
    (root / "img").mkdir(parents=True)
    outside.mkdir()
    PIL.Image.new("RGB", (28, 28), (200, 10, 10)).save(root / "img" / "ok.png")
    PIL.Image.new("RGB", (28, 28), (10, 10, 200)).save(outside / "secret.png")
    png_bomb(root / "img" / "bomb900.png", 30000, 30000)        # 900 MP: Pillow's DecompressionBombError
    png_bomb(root / "img" / "big169.png", 13000, 13000)         # 169 MP: Pillow only warns
    os.symlink(outside / "secret.png", root / "img" / "link.png")
    return root, outside


@pytest.fixture
def opened(monkeypatch):
    """Every path PIL.Image.open is called with, and every image whose pixels are decoded (load)."""
    calls = {"open": [], "load": []}
    real_open, real_load = PIL.Image.open, PIL.ImageFile.ImageFile.load

    def spy_open(fp, *args, **kwargs):
        calls["open"].append(os.path.realpath(fp) if isinstance(fp, (str, os.PathLike)) else fp)
        return real_open(fp, *args, **kwargs)

    def spy_load(self):
        calls["load"].append((getattr(self, "filename", None), self.size))
        return real_load(self)

    monkeypatch.setattr(PIL.Image, "open", spy_open)
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", spy_load)
    return calls


def run(cfg_overrides, tok, proc, manifest):
    it = make_pipeline({**CFG, **cfg_overrides}, tok, proc, sources=manifest)
    batches = list(it)
    return it.stats(), batches


# ------------------------------------------------------------------------------------------ image size


def test_bombs_are_skipped_without_decoding(tok, proc, data, opened):
    root, _ = data
    manifest = write_lines(root / "bombs.jsonl", [line("good", "img/ok.png"), line("bomb", "img/bomb900.png"),
                                                  line("big", "img/big169.png"), line("good2", "img/ok.png")])
    stats, _ = run({}, tok, proc, manifest)
    assert stats["skipped"] == {"image_too_large": 2} and stats["samples"] == 2
    assert all(size == (28, 28) for _, size in opened["load"])          # only the good images were decoded


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_bomb_warning_as_error_is_a_bad_record(tok, proc, data):
    root, _ = data
    manifest = write_lines(root / "warn.jsonl", [line("big", "img/big169.png"), line("good", "img/ok.png")])
    stats, _ = run({"max_image_pixels": 10 ** 9}, tok, proc, manifest)   # Pillow's warning refuses it first
    assert stats["skipped"] == {"image_too_large": 1} and stats["samples"] == 1


def test_bomb_raises_naming_the_record(tok, proc, data):
    root, _ = data
    manifest = write_lines(root / "bomb-raise.jsonl", [line("good", "img/ok.png"), line("bomb", "img/bomb900.png")])
    with pytest.raises(BadRecordError, match=r"bomb-raise\.jsonl:2 \(id=bomb\): image_too_large"):
        run({"on_bad_record": "raise"}, tok, proc, manifest)


def test_pixel_limit_is_configurable(tok, proc, data):
    root, _ = data
    manifest = write_lines(root / "limit.jsonl", [line("a", "img/ok.png"), line("b", "img/ok.png")])
    assert run({}, tok, proc, manifest)[0]["skipped"] == {}
    stats, _ = run({"max_image_pixels": 28 * 28 - 1}, tok, proc, manifest)
    assert stats["skipped"] == {"image_too_large": 2}


def test_peak_memory_stays_small_on_bombs(data):
    """In a fresh process (a clean peak): processing both bombs raises the peak RSS by < 200 MB."""
    root, _ = data
    script = f"""
import json, resource
from glmv_jax.data.records import BadRecordError, parse_record
from glmv_jax.data.transforms import Processor, process_vision
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
reasons = []
for name in ("bomb900.png", "big169.png"):
    record = parse_record({{"raw": {{"id": name, "images": ["img/" + name], "text": "<image>x"}},
                           "where": name, "base_dir": {str(root)!r}}})
    try:
        process_vision(record, Processor())
        reasons.append("decoded")
    except BadRecordError as e:
        reasons.append(e.reason)
    except Exception as e:
        reasons.append(type(e).__name__)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"reasons": reasons, "peak_delta_mb": (after - before) / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["reasons"] == ["image_too_large", "image_too_large"]
    assert result["peak_delta_mb"] < 200, result


# ------------------------------------------------------------------------------------------ paths


ESCAPES = {"dotdot": "../outside/secret.png", "absolute": None, "symlink": "img/link.png"}


def escape_lines(outside):
    paths = {**ESCAPES, "absolute": str(outside / "secret.png")}
    return [line("good", "img/ok.png")] + [line(name, path) for name, path in paths.items()]


def test_paths_outside_root_are_refused_and_never_opened(tok, proc, data, opened):
    root, outside = data
    manifest = write_lines(root / "escape.jsonl", escape_lines(outside))
    stats, _ = run({}, tok, proc, manifest)
    assert stats["skipped"] == {"path_outside_root": 3} and stats["samples"] == 1
    secret = os.path.realpath(outside / "secret.png")
    assert opened["open"] and secret not in opened["open"]
    with pytest.raises(BadRecordError, match=r"escape\.jsonl:2 \(id=dotdot\): path_outside_root"):
        run({"on_bad_record": "raise"}, tok, proc, manifest)
    stats, _ = run({"data_root": str(root.parent)}, tok, proc, manifest)     # a wider root allows them
    assert stats["skipped"] == {} and stats["samples"] == 4


# ------------------------------------------------------------------------------------------ UTF-8


def test_invalid_utf8_is_counted_or_raises(tok, proc, data):
    root, _ = data
    bad = b'{"id": "latin1", "images": ["img/ok.png"], "text": "<image>caf\xe9"}'
    manifest = write_lines(root / "utf8.jsonl", [line("good", "img/ok.png"), bad, line("good2", "img/ok.png")])
    stats, _ = run({}, tok, proc, manifest)
    assert stats["skipped"] == {"invalid_utf8": 1} and stats["samples"] == 2
    with pytest.raises(BadRecordError, match=r"utf8\.jsonl:2 \(id=latin1\): invalid_utf8: invalid UTF-8 byte 0xe9"):
        run({"on_bad_record": "raise"}, tok, proc, manifest)


# ------------------------------------------------------------------------------------------ config


def stage_config(name, *overrides):
    """experiments/configs/<name>.py:runlocal parsed with command-line overrides, as experiments.run parses it."""
    argv = ["prog", f"--config={REPO / 'experiments' / 'configs' / name}.py:runlocal", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=False, sys_argv=argv)
    values(argv)
    return values.config


@pytest.mark.parametrize("stage", ["pretrain", "long_context", "sft", "rl"])
def test_comma_separated_manifests_flag(stage):
    cfg = stage_config(stage, "--config.data.source=jsonl", "--config.data.manifests=/data/a.jsonl,b.jsonl")
    validate(cfg)
    assert data_config(cfg.data).manifests == ("/data/a.jsonl", "b.jsonl")
    single = stage_config(stage, "--config.data.source=jsonl", "--config.data.manifests=/data/a.jsonl")
    assert data_config(single.data).manifests == ("/data/a.jsonl",)


def test_manifests_need_a_reading_source():
    with pytest.raises(ConfigError, match="data.source='synthetic' ignores it"):
        validate(stage_config("sft", "--config.data.manifests=a.jsonl"))
    with pytest.raises(ConfigError, match="needs data.manifests"):
        validate(stage_config("sft", "--config.data.source=jsonl"))


def test_example_manifests_through_the_stages(tok, proc):
    """The shipped examples: SFT batches from two manifests given as one flag, RL prompts with their origin."""
    both = f"{EXAMPLES / 'sft.jsonl'},{EXAMPLES / 'pretrain.jsonl'}"
    cfg = stage_config("sft", "--config.data.source=jsonl", f"--config.data.manifests={both}")
    it = make_pipeline(cfg.data, tok, proc, num_epochs=1, shuffle=False)
    list(it)
    assert it.stats()["samples"] == 8 and it.stats()["skipped"] == {}
    rl = stage_config("rl", "--config.data.source=jsonl", f"--config.data.manifests={EXAMPLES / 'rl.jsonl'}")
    records = prompt_records(rl, "rl", 0, seed=0)
    assert [r["id"] for r in records] == ["rl-circles", "rl-hello", "rl-bars"]
    assert records[1]["_where"] == "rl.jsonl:2"


# ------------------------------------------------------------------------------------------ validate


def test_validate_reports_reasons_and_lines(data, capsys):
    root, outside = data
    bad_utf8 = b'{"id": "latin1", "images": ["img/ok.png"], "text": "<image>caf\xe9"}'
    manifest = write_lines(root / "check.jsonl", [
        line("good", "img/ok.png"), bad_utf8, line("dotdot", "../outside/secret.png"),
        line("bomb", "img/bomb900.png"), line("gone", "img/missing.png"), '{"id": "broken", ',
        line("big", "img/big169.png")])
    assert validate_main([manifest, "--show", "3"]) == 1
    out = capsys.readouterr().out
    assert "7 records: 1 ok (interleaved 1), 6 bad" in out
    for reason, n in (("invalid_utf8", 1), ("path_outside_root", 1), ("image_too_large", 2), ("missing_image", 1),
                      ("invalid_json", 1)):
        assert f"  {reason}: {n}\n" in out
    assert "check.jsonl:2 (id=latin1)  invalid_utf8" in out and "check.jsonl:3 (id=dotdot)  path_outside_root" in out
    assert "check.jsonl:4 (id=bomb)  image_too_large" in out and "check.jsonl:5" not in out      # --show 3
    assert validate_main([manifest, "--data-root", str(root.parent), "--show", "0"]) == 1   # the rest stay bad
    assert "path_outside_root" not in capsys.readouterr().out


def test_validate_command_on_the_examples():
    manifests = [str(EXAMPLES / f"{name}.jsonl") for name in ("sft", "pretrain", "rl")]
    out = subprocess.run([sys.executable, "-m", "glmv_jax.data.validate", *manifests], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "11 records: 11 ok" in out.stdout and "0 bad" in out.stdout
    missing = subprocess.run([sys.executable, "-m", "glmv_jax.data.validate", "nowhere.jsonl"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "not found" in missing.stderr
