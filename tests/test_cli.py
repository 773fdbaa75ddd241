"""The ``fluxtune`` command outside search: help, env, show, presets, generate, errors and --debug."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import yaml

from fluxtune.cli import COMMANDS, main
from fluxtune.presets import list_presets, load_profile, preset_dir

FLUX1_PRESETS = {"flux-dev-8gb", "flux-dev-12gb", "flux-dev-24gb", "flux-dev-fast"}
PRESETS = FLUX1_PRESETS | {"dit-xl-2-8gb", "flux2-klein-4b-8gb", "flux2-klein-9b-12gb", "flux2-dev-24gb", "flux2-dev-32gb",
                           "qwen-image-16gb", "qwen-image-24gb"}


def cli(*argv: object) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue())


def fluxtune_lines(err: str) -> list[str]:
    """fluxtune's own lines on stderr (libraries may log their import-time notices there)."""
    return [line for line in err.strip().splitlines() if line.startswith("fluxtune")]


def test_help_is_instant_and_imports_no_torch(tmp_path):
    probe = (
        "import json, sys, time\n"
        "t = time.perf_counter()\n"
        "from fluxtune.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'torchao', 'optuna', 'matplotlib') if m in sys.modules]\n"
        "print(json.dumps({'code': code, 'heavy': heavy, 'seconds': time.perf_counter() - t}), file=sys.stderr)\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    info = json.loads(res.stderr.strip().splitlines()[-1])
    assert info["code"] == 0 and info["heavy"] == [], info
    assert info["seconds"] < 5.0, info  # about 0.3 s; generous for a loaded CI machine
    for name in COMMANDS:
        assert name in res.stdout
    # The installed entry point too (python -m fluxtune is the same main).
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "fluxtune", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "search" in res.stdout
    assert time.perf_counter() - t0 < 15.0


def test_no_command_prints_help_and_exits_2():
    res = cli()
    assert res.code == 2 and "usage" in res.out


def test_env_on_cpu():
    from fluxtune.hardware import detect_hardware

    res = cli("env")
    assert res.code == 0 and "hardware" in res.out and "versions" in res.out
    assert "torch" in res.out and "offload" in res.out
    res = cli("env", "--json")
    assert res.code == 0
    data = json.loads(res.out)
    assert set(data) == {"hardware", "card", "versions", "knobs"}
    assert data["versions"]["torch"].startswith("2.")
    if not detect_hardware().has_cuda:
        assert data["hardware"]["name"] is None
        assert data["knobs"]["offload (model/sequential/group/partial)"].startswith("no")
        assert data["knobs"]["quantize int8_weight / int8_dynamic"] == "yes"


def test_show_applies_overrides_and_prints_valid_yaml():
    res = cli("show", preset_dir() / "flux-dev-12gb.yaml", "transformer.quantize=int8_weight")
    assert res.code == 0, res.err
    data = yaml.safe_load(res.out)
    assert data["transformer"]["quantize"]["method"] == "int8_weight"
    prof = load_profile(data)  # what show prints loads back as the same profile
    assert prof.transformer.quantize is not None and prof.transformer.quantize.method == "int8_weight"
    assert prof.name == "flux-dev-12gb"
    # By preset name as well, and --minimal prints only what differs from the defaults.
    minimal = cli("show", "flux-dev-12gb", "--minimal")
    assert minimal.code == 0 and len(minimal.out) < len(res.out)
    assert load_profile(yaml.safe_load(minimal.out)) == load_profile("flux-dev-12gb")


@pytest.mark.parametrize(("override", "needle"), [
    ("transformer.quantize=int9", "int9"),
    ("transformer.nosuch=1", "nosuch"),
    ("generation.height=100", "multiple of 16"),
    ("noequals", "noequals"),
])
def test_show_with_a_bad_override_is_one_line_and_exit_2(override, needle):
    res = cli("show", "flux-dev-12gb", override)
    assert res.code == 2
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("fluxtune show: error:"), lines
    assert res.out == ""


def test_show_an_unknown_profile_names_the_presets():
    res = cli("show", "no-such-profile")
    assert res.code == 2
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "flux-dev-12gb" in lines[0]


def test_presets_lists_the_shipped_profiles():
    assert set(list_presets()) == PRESETS
    res = cli("presets", "--json")
    assert res.code == 0
    rows = json.loads(res.out)
    assert {r["preset"] for r in rows} == PRESETS
    # One row per variant, sorted by budget; every class of card has a FLUX variant of each tier.
    assert [r["budget"] for r in rows if r["variant"] == "ada" and r["preset"] in FLUX1_PRESETS] == ["8GB", "12GB", "24GB", "32GB"]
    assert all({"ampere", "ada", "hopper", "blackwell"} == {c for r in rows if r["preset"] == name for c in r["classes"]}
               for name in PRESETS)
    table = cli("presets")
    assert table.code == 0 and all(name in table.out for name in PRESETS)
    on = json.loads(cli("presets", "--gpu", "RTX 4060", "--json").out)
    mine = [r for r in on if r["runs_on_gpu"] and r["preset"] == "flux-dev-8gb"]
    assert [r["variant"] for r in mine] == ["ada"] and mine[0]["predicted_s"] > 0
    bad = cli("presets", "--gpu", "RTX 4606")
    assert bad.code == 2 and "closest: RTX 4060" in bad.err and len(bad.err.strip().splitlines()) == 1


@pytest.fixture
def small_profile(tmp_path):
    path = tmp_path / "cpu-small.yaml"
    path.write_text("name: cpu-small\nfamily: flux\ngeneration:\n  steps: 2\n")
    return path


def test_generate_writes_a_png_and_prints_latency(tmp_path, small_profile, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "x.png"
    res = cli("generate", small_profile, "--model", "tiny-flux", "--prompt", "a red circle", "--out", out)
    assert res.code == 0, res.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (64, 64)
    assert "applied profile 'cpu-small'" in res.out
    import re

    assert re.search(r"1 image\(s\) in [0-9.]+s", res.out), res.out


def test_generate_with_overrides_and_several_prompts(tmp_path, small_profile):
    out = tmp_path / "many.png"
    res = cli("generate", small_profile, "transformer.quantize=int8_weight", "--model", "tiny-flux",
              "--prompt", "a red circle", "--prompt", "a blue square", "--out", out)
    assert res.code == 0, res.err
    assert "quantize" in res.out and "int8_weight" in res.out
    assert (tmp_path / "many_0.png").exists() and (tmp_path / "many_1.png").exists()


def test_generate_negative_prompt_turns_on_true_cfg_verbatim(tmp_path, small_profile):
    # FluxPipeline runs true CFG only above true_cfg_scale 1; the text is passed as written, not parsed as YAML.
    out = tmp_path / "cfg.png"
    res = cli("generate", small_profile, "generation.true_cfg_scale=2", "--model", "tiny-flux", "--prompt", "a red circle",
              "--negative-prompt", "blurry: 1", "--out", out)
    assert res.code == 0, res.err
    assert "negative_prompt='blurry: 1'" in res.out and "true CFG: two transformer passes a step" in res.out
    refused = cli("generate", small_profile, "--model", "tiny-flux", "--negative-prompt", "blurry", "--out", out)
    assert refused.code == 2 and "set generation.true_cfg_scale above 1" in refused.err


@pytest.mark.parametrize(("preset", "field"), [
    ("flux-dev-12gb", "transformer.offload.mode=partial"),
    ("flux-dev-24gb", "transformer.quantize.method=fp8_dynamic"),
])
def test_generate_a_gpu_only_profile_on_cpu_is_one_line_exit_2(tmp_path, preset, field):
    from fluxtune.hardware import detect_hardware

    if detect_hardware().has_cuda:
        pytest.skip("this machine has a GPU")
    res = cli("generate", preset, "--model", "tiny-flux", "--out", tmp_path / "y.png")
    assert res.code == 2
    lines = fluxtune_lines(res.err)
    assert len(lines) == 1 and lines[0].startswith("fluxtune generate: error:") and field in lines[0], res.err
    assert "needs a CUDA GPU" in lines[0] and "Traceback" not in res.err
    assert not (tmp_path / "y.png").exists()


def test_debug_shows_the_traceback(tmp_path):
    from fluxtune.hardware import detect_hardware

    if detect_hardware().has_cuda:
        pytest.skip("this machine has a GPU")
    res = subprocess.run([sys.executable, "-m", "fluxtune", "--debug", "generate", "flux-dev-12gb", "--model",
                          "tiny-flux", "--out", str(tmp_path / "y.png")], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode != 0
    assert "Traceback (most recent call last)" in res.stderr
    assert "UnsupportedHardwareError" in res.stderr and "transformer.offload.mode=partial" in res.stderr
    # Without --debug, the same failure is one line.
    res = cli("show", "flux-dev-12gb", "transformer.quantize=int9")
    assert "Traceback" not in res.err
    with pytest.raises(Exception, match="int9"):
        main(["--debug", "show", "flux-dev-12gb", "transformer.quantize=int9"])


# -- issue 18: bad input is one line and exit 2, and nothing is left behind -------------------------------


def one_error_line(res: SimpleNamespace, command: str) -> str:
    lines = fluxtune_lines(res.err)
    assert res.code == 2, (res.code, res.out[-1500:], res.err[-1500:])
    assert len(lines) == 1 and lines[0].startswith(f"fluxtune {command}: error:"), res.err
    assert "Traceback" not in res.err
    return lines[0]


@pytest.mark.parametrize(("text", "needle"), [
    ("name: a\nname: b\n", "line 2, column 1: duplicate key 'name'"),
    ("", "the file is empty"),
    ("budget: {vram: 1e30}\n", "more memory than any machine has"),
    ("budget: {vram: .inf}\n", "budget.vram=inf"),
    ("generation: {height: .inf}\n", "generation.height"),
    ("generation:\n  steps: [1, 2\n", "line 3"),
    ("- a\n- b\n", "a mapping of sections"),
    ("1: x\n", "not a section name"),
    ("a: &x [1]\nb: *x\n", "unknown key 'a'"),  # aliases are fine, the keys are not
])
def test_bad_profile_files_keep_the_location_and_name_the_fix(tmp_path, text, needle):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    line = one_error_line(cli("show", path), "show")
    assert needle in line, line


def test_a_big_alias_free_file_is_not_called_alias_expansion(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("description: '" + "x" * 2_000_000 + "'\n")
    line = one_error_line(cli("show", path), "show")
    assert "too large for a profile" in line and "aliases" not in line


def test_nested_aliases_are_refused_before_they_expand(tmp_path):
    path = tmp_path / "laughs.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    path.write_text("\n".join(lines) + "\n")
    assert "through YAML anchors/aliases" in one_error_line(cli("show", path), "show")


def test_off_and_on_are_choice_names(tmp_path):
    path = tmp_path / "off.yaml"
    path.write_text("compile: {mode: off}\nbudget: {vram: 8GB, enforce: yes}\n")
    prof = load_profile(path)
    assert prof.compile.mode == "off" and prof.budget.enforce is True
    assert load_profile({}, ["compile.mode=off"]).compile.mode == "off"
    assert load_profile({}, ["compile=off", "compile.fuse_qkv=true"]).compile.fuse_qkv
    assert load_profile({"compile": {"mode": False}}).compile.mode == "off"  # what a YAML 1.1 reader hands over
    res = cli("show", path, "compile.mode=off")
    assert res.code == 0 and "mode: 'off'" in res.out or "mode: off" in res.out


def test_override_yaml_errors_are_one_line(tmp_path):
    line = one_error_line(cli("show", "flux-dev-12gb", "generation.steps=[1,2"), "show")
    assert "generation.steps" not in line or "[1,2" in line
    assert "'[1,2'" in line and "line 1" in line


def test_generate_bad_inputs_fail_before_loading_and_write_nothing(tmp_path, small_profile):
    cases = [
        (["--device", "gpu"], "--device 'gpu'"),
        (["--device", "cuda:7"], "--device 'cuda:7'"),
        (["--class-label", "-1", "--model", "tiny-dit"], "--class-label -1"),
        (["--dtype", "int3"], "--dtype 'int3'"),
        (["--model", "no-such-model"], "--model 'no-such-model'"),
        (["--out", str(tmp_path)], "--out"),
        (["--out", str(tmp_path / "x.jpg")], "PNG"),
        (["--out", "/proc/nope/x.png"], "cannot be written"),
        (["--prompt", ""], "--prompt ''"),
        (["--class-label", "3"], "--class-label is for class-conditional"),
        (["--seed", "-5"], "--seed -5"),
    ]
    for extra, needle in cases:
        res = cli("generate", small_profile, "--model", "tiny-flux", "--out", tmp_path / "y.png", *extra)
        assert needle in one_error_line(res, "generate"), (extra, res.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu-small.yaml"]
    res = cli("generate", small_profile, "--model", "tiny-dit", "--class-label", "5000", "--out", tmp_path / "y.png")
    assert "classes 0..999" in one_error_line(res, "generate")


def test_generate_several_prompts_under_a_budget_and_a_larger_size_on_cpu(tmp_path):
    path = tmp_path / "capped.yaml"
    path.write_text("name: capped\nfamily: flux\nbudget: {vram: 1GB}\ngeneration: {steps: 2, height: 32, width: 32}\n")
    res = cli("generate", path, "generation.height=64", "--model", "tiny-flux", "--prompt", "a", "--prompt", "b",
              "--out", tmp_path / "o.png")
    assert res.code == 0, res.err
    assert (tmp_path / "o_0.png").exists() and (tmp_path / "o_1.png").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed


def test_atomic_writes_never_leave_a_torn_file(tmp_path):
    import threading

    from fluxtune.presets import write_atomic

    target = tmp_path / "img.png"
    payloads = [bytes([i]) * 2_000_000 for i in range(8)]
    errors = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(5):
                write_atomic(target, data)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    seen = set()
    while any(t.is_alive() for t in threads):
        if target.exists():
            data = target.read_bytes()
            seen.add(len(data))
            assert data in payloads  # whole, never a mix or a prefix
    for t in threads:
        t.join()
    assert not errors and target.read_bytes() in payloads
    assert seen <= {2_000_000}
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]


def test_save_profile_is_atomic_and_write_measured_keeps_comments(tmp_path):
    from fluxtune.presets import save_profile, update_measured

    path = tmp_path / "mine.yaml"
    path.write_text("# my notes on this profile\nname: mine  # the name\ngeneration:\n  steps: 4  # fast\n"
                    "measured:\n  status: unmeasured\n# trailing note\n")
    prof = load_profile(path)
    new = prof.replace(measured={"status": "measured", "source": "fluxtune bench", "latency_s": 1.5,
                                 "model": "tiny-flux"})
    update_measured(path, new)
    text = path.read_text()
    assert "# my notes on this profile" in text and "# the name" in text and "# fast" in text
    assert "# trailing note" in text and "latency_s: 1.5" in text and "unmeasured" not in text
    assert load_profile(path) == new
    # no measured block yet: appended
    other = tmp_path / "other.yaml"
    other.write_text("# keep me\nname: other\n")
    update_measured(other, load_profile(other).replace(measured={"status": "measured", "latency_s": 2.0}))
    assert other.read_text().startswith("# keep me\nname: other\n") and load_profile(other).measured.latency_s == 2.0
    out = save_profile(new, tmp_path / "sub" / "saved.yaml", header="line one\nline two")
    assert out.read_text().startswith("# line one\n# line two\n") and load_profile(out) == new
    assert sorted(p.name for p in out.parent.iterdir()) == ["saved.yaml"]


def test_report_of_a_missing_study_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(cli("report", "MISSING"), "report")
    assert "MISSING" in line and "journal" in line
    assert list(tmp_path.iterdir()) == []
    assert "--study '..'" in one_error_line(cli("report", ".."), "report")
    assert "--storage" in one_error_line(cli("report", "x", "--storage", "not a url"), "report")


def test_bench_and_sensitivity_check_their_inputs_before_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for extra, needle in [(["--model", "nope"], "--model 'nope'"), (["--dtype", "x"], "--dtype 'x'"),
                          (["--runs", "0"], "--runs 0"), (["--device", "cuda:9"], "--device 'cuda:9'"),
                          (["--recipe-time-box", "nan"], "--recipe-time-box"), (["--timeout", "0"], "--timeout"),
                          (["--steps", "0"], "--steps 0"), (["--recipes", "zzz"], "'zzz' names no recipe"),
                          (["--samples", "-3"], "--samples -3")]:
        assert needle in one_error_line(cli("bench", "flux-dev-12gb", *extra), "bench"), extra
    (tmp_path / "file").write_text("x")
    assert "is a file" in one_error_line(cli("bench", "flux-dev-12gb", "--out", "file"), "bench")
    for extra, needle in [(["--out", "/proc/nope/s.json"], "cannot be written"), (["--labels", "0,-1"], "start at 0"),
                          (["--device", "tpu"], "--device 'tpu'"), (["--model", "nope"], "--model 'nope'")]:
        assert needle in one_error_line(cli("sensitivity", *extra), "sensitivity"), extra
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.slow
def test_sensitivity_prints_the_exclude_patterns(tmp_path):
    res = cli("sensitivity", "--model", "tiny-dit", "--proxy", "--top", "2", "--out", tmp_path / "s.json")
    assert res.code == 0, res.err
    assert "exclude patterns" in res.out
    pats = [line.strip() for line in res.out.splitlines() if line.startswith("  ^")]
    assert len(pats) == 2 and all(p.endswith("$") for p in pats)
    import re

    for p in pats:
        re.compile(p)
    assert "exclude: ['" in res.out and "\\\\" not in res.out.split("exclude: [", 1)[1]


def test_library_noise_is_silenced_unless_debug(tmp_path):
    cmd = [sys.executable, "-m", "fluxtune", "generate", "flux-dev-fast", "compile=off", "attention.backend=native",
           "compile.fuse_qkv=false", "transformer.quantize=int8_weight", "generation.steps=2", "generation.height=32",
           "generation.width=32", "--model", "tiny-flux", "--out", str(tmp_path / "q.png")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    noise = ("Failed to load", "_pytree", "Unable to import", "torchvision", "Loading pipeline components",
             "id2label", "experimental")
    assert not [line for line in res.stderr.splitlines() if any(n in line for n in noise)], res.stderr
    # fluxtune's own warnings still show, one line each: this preset was measured on an H200 replica
    warnings = [line for line in res.stderr.splitlines() if line.startswith("fluxtune: warning:")]
    assert any("NVIDIA H200" in w for w in warnings) and any("flux-dev-replica" in w for w in warnings), res.stderr
    debug = subprocess.run([sys.executable, "-m", "fluxtune", "--debug", *cmd[3:]], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert debug.returncode == 0
    assert any(n in debug.stderr for n in noise)  # the libraries speak again with --debug


def test_dit_mini_id2label_note_is_silenced(tmp_path):
    path = tmp_path / "dit.yaml"
    path.write_text("name: dit-cpu\nfamily: dit\ngeneration: {steps: 2}\n")
    res = subprocess.run([sys.executable, "-m", "fluxtune", "generate", str(path), "--model", "dit-mini",
                          "--class-label", "1", "--out", str(tmp_path / "d.png")], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "id2label" not in res.stderr and "Loading pipeline components" not in res.stderr, res.stderr
    assert (tmp_path / "d.png").exists()


def test_knobs_lists_every_key_with_what_it_does() -> None:
    """The reference is read from the profile's models: a new knob shows up by itself, and one without a
    description fails here."""
    r = cli("knobs", "--json")
    assert r.code == 0
    rows = {row["key"]: row for row in json.loads(r.out)}
    for key in ("budget.vram", "transformer.dtype", "transformer.quantize.method", "transformer.offload.mode=partial",
                "transformer.offload[mode=partial].resident", "cache[kind=magcache].threshold", "matmul.fp16_accumulation",
                "generation.batch_cfg", "loras[].path", "vae.tiling", "compile.mode"):
        assert key in rows, key
    assert not [k for k, row in rows.items() if not row["description"]]
    assert rows["transformer.offload[mode=partial].resident"]["type"].startswith("bytes")
    assert rows["compile.mode"]["type"] == "off | regional | full" and rows["compile.mode"]["default"] == "off"
    assert not any(k.startswith(("measured", "variants", "text_encoder")) for k in rows)
    r = cli("knobs", "offload")
    assert r.code == 0 and "transformer.offload[mode=group].level" in r.out and "cache" not in r.out
    r = cli("knobs", "nothing")
    assert r.code == 2 and "no key contains 'nothing'; sections: attention, budget" in r.err
