"""One CLI vocabulary (issue 29): every command's options, read from the typer app itself, use one name per
concept with one type; every command that reads images takes --limit; torch commands take --threads; the
choices --help offers are the ones the command accepts; usage mistakes exit 2."""

from __future__ import annotations

import enum
import inspect
import typing
from pathlib import Path

import pytest

from diffscore.app.cli import app

# a concept -> its one name; the names other commands once used for it must not come back
SYNONYMS = {
    "--timesteps": ["--steps", "--num-timesteps", "--n-timesteps", "--dsd-steps"],
    "--noise-steps": ["--noise-step", "--image-step", "--t"],
    "--sampling-steps": ["--generate-steps", "--sample-steps", "--ddim-steps"],
    "--limit": ["--max-images", "--num-images", "--n-images", "--first"],
    "--text": ["--texts", "--caption", "--captions", "--prompt-text"],
    "--labels": ["--label", "--classes"],
    "--grid": ["--grid-size"],
}
TORCH_COMMANDS = {"export", "parity", "train-head", "train-prompts", "train-diffdis", "finetune"}


def base_type(annotation) -> str:
    """int / float / str / Path / bool / choice, through Optional[...] and List[...]."""
    while typing.get_origin(annotation) in (typing.Union, list, typing.List):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "choice"
    return getattr(annotation, "__name__", str(annotation))


def is_list(annotation) -> bool:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return any(typing.get_origin(a) in (list, typing.List) for a in args)


def commands() -> dict[str, dict[str, dict]]:
    """command -> option name (long) -> {type, list, choices}, plus "@args" -> positional argument names."""
    found = {}
    for command in app.registered_commands:
        fn = command.callback
        name = command.name or fn.__name__.replace("_", "-")
        hints = typing.get_type_hints(fn)
        options, args = {}, []
        for param in inspect.signature(fn).parameters.values():
            info = param.default
            if type(info).__name__ == "ArgumentInfo":
                args.append(param.name)
                continue
            decls = [d for d in (info.param_decls or ()) if d.startswith("--")] or [f"--{param.name.replace('_', '-')}"]
            annotation = hints[param.name]
            inner = annotation
            while typing.get_origin(inner) in (typing.Union, list, typing.List):
                inner = next(a for a in typing.get_args(inner) if a is not type(None))
            choices = {e.value for e in inner} if isinstance(inner, type) and issubclass(inner, enum.Enum) else None
            options[decls[0]] = {"type": base_type(annotation), "list": is_list(annotation), "choices": choices,
                                 "aliases": decls[1:]}
        found[name] = {**options, "@args": args}
    return found


COMMANDS = commands()


def test_every_command_is_seen():
    assert {"classify", "match", "info", "demo", "defaults", "export", "train-head", "parity", "profile", "calibrate",
            "train-prompts", "train-diffdis", "finetune", "batch", "serve"} <= set(COMMANDS)


def test_one_name_per_concept():
    used = {name: command for command, options in COMMANDS.items() for name in options if name != "@args"}
    used.update({a: command for command, options in COMMANDS.items() for o in options.values()
                 if isinstance(o, dict) for a in o["aliases"]})
    for canonical, others in SYNONYMS.items():
        for other in others:
            assert other not in used, f"`{used.get(other)}` names {canonical} `{other}`; use {canonical}"


def test_one_type_per_name():
    seen: dict[str, set] = {}
    for command, options in COMMANDS.items():
        for name, option in options.items():
            if name != "@args":
                seen.setdefault(name, set()).add(option["type"])
    mixed = {name: types for name, types in seen.items() if len(types) > 1}
    assert not mixed, f"one option name, several types: {mixed}"


def test_text_is_one_caption_repeated_everywhere():
    for command, options in COMMANDS.items():
        if "--text" in options:
            assert options["--text"]["list"], f"{command} --text must be repeatable (one caption per --text)"
            assert "--texts-file" in options, f"{command} takes --text, so also --texts-file"


def test_limit_wherever_images_are_read():
    readers = [c for c, options in COMMANDS.items() if "images" in options["@args"]]
    assert {"classify", "match", "profile", "parity", "calibrate", "batch"} <= set(readers)
    assert not [c for c in readers if "--limit" not in COMMANDS[c]], "commands reading images without --limit"
    assert all(COMMANDS[c]["--limit"]["type"] == "int" for c in readers + ["demo"])


def test_threads_on_every_torch_command():
    assert not [c for c in TORCH_COMMANDS if "--threads" not in COMMANDS[c]]


def test_help_offers_only_accepted_choices():
    assert COMMANDS["export"]["--precision"]["choices"] == {"fp32", "fp16"}  # int8: calibrate; bf16: a runtime hint
    assert COMMANDS["info"]["--format"]["choices"] == {"table", "json"}
    assert COMMANDS["build-trt"]["--precision"]["choices"] == {"fp32", "fp16", "int8"}


@pytest.mark.parametrize("args", [
    ["export", "{model}", "{tmp}/e", "-p", "int8"],
    ["export", "{model}", "{tmp}/e", "-p", "bf16"],
    ["info", "{engine}", "-f", "csv"],
    ["classify", "{engine}", "{tmp}/x.png", "--labels", "a,b", "-p", "int8"],  # offered; this engine has no int8
    ["classify", "{engine}", "{tmp}/x.png", "--labels", "a,b", "-p", "bf16", "-b", "ort-cpu"],
    ["match", "{engine}", "{tmp}/x.png", "--text", "a", "--texts-file", "t.txt"],
    ["export", "{model}", "{tmp}/e", "--template", "no field"],
    ["export", "{model}", "{tmp}/e", "--stages", "5"],
    ["defaults", "{engine}", "--z", "-1"],
    ["train-diffdis", "{model}", "--demo", "--out", "{tmp}/r", "--noise-steps", "10,20"],
    ["profile", "{engine}", "{tmp}/x.png", "--labels", "a,b", "--timesteps", "10"],  # the grid is --grid
], ids=lambda a: " ".join(a[:1] + a[3:]))
def test_usage_mistakes_exit_2(run_cli, demo_model, demo_engine, tmp_path, args):
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    code, err = run_cli(*[a.format(model=demo_model, engine=demo_engine, tmp=tmp_path) for a in args])
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_head_dir_named_in_the_hint(run_cli, demo_engine, tmp_path):
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    code, err = run_cli("classify", demo_engine, tmp_path / "x.png", "--method", "head")
    assert code == 1 and "export MODEL OUT --head-dir HEAD_DIR" in err, err  # the engine has no head: the real flag


def test_a_caption_with_a_comma_is_one_caption_and_says_so(run_cli_out, demo_engine, tmp_path):
    import json

    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    code, out, err = run_cli_out("match", demo_engine, tmp_path / "x.png", "--text", "a,b", "--timesteps", "1",
                                 "-f", "json")
    assert code == 0, err
    assert list(json.loads(out)[0]["scores"]) == ["a,b"] and "repeat --text" in err


def sigterm_caught(pid: int) -> bool:
    """Whether process `pid` has a handler for SIGTERM (Linux: the SigCgt mask of /proc/PID/status)."""
    import signal

    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.parametrize("command", [
    ["classify", "{engine}", "{images}", "--labels", "zero,one,two,three", "--stages", "1000:1"],
    ["train-prompts", "{model}", "--demo", "--shots", "2", "--train-steps", "100000", "--out", "{tmp}/run"],
], ids=lambda c: c[0])
def test_sigterm_ends_a_long_command_with_143(demo_model, demo_engine, tmp_path, command):
    import signal
    import subprocess
    import sys
    import time

    from PIL import Image

    from diffscore.app.digits import load_digits_split

    (tmp_path / "digits").mkdir()
    for i, image in enumerate(load_digits_split().test_images[:40]):
        Image.fromarray(image).save(tmp_path / "digits" / f"{i}.png")
    args = [a.format(engine=demo_engine, model=demo_model, images=tmp_path / "digits", tmp=tmp_path) for a in command]
    proc = subprocess.Popen([sys.executable, "-m", "diffscore.app.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)  # not the checkout: its kernels/ folder
    # would shadow the `kernels` package transformers looks for
    # Into the work, however loaded the machine: the CLI's SIGTERM handler is installed (bit 15 of SigCgt),
    # and a classification has said what it costs (its cost line comes before any pass).
    try:
        deadline = time.monotonic() + 600
        while not sigterm_caught(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        said = []  # a classification's lines up to its cost line (the `auto` backend's timing note may come first)
        while command[0] == "classify" and not (said and said[-1].startswith("stages")):
            said.append(proc.stderr.readline())
            if not said[-1]:
                break
        time.sleep(2)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:  # a failed test must not leave a 100,000-step run behind
        proc.kill()
    err = "".join(said) + err
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "error: terminated (SIGTERM); nothing half-written was left", err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()
    if command[0] == "classify":  # a long run first says what it costs: 4 labels x 1,000 timesteps
        assert any(line.startswith("stages: 4,000 UNet passes per image, 40 images") for line in said), err


def test_a_swallowed_sigterm_still_ends_the_command(tmp_path):
    """The KeyboardInterrupt SIGTERM raises can be swallowed (inside a finaliser); the backstop ends the run."""
    import signal
    import subprocess
    import sys
    import time

    spin = (
        "import time\n"
        "import diffscore.app.cli as cli\n"
        "cli.TERM_GRACE_S = 1\n"
        "@cli.app.command('spin')\n"
        "def spin():\n"
        "    said = False\n"
        "    while True:\n"
        "        try:  # 'ready' inside the try: a signal right after it is swallowed too\n"
        "            if not said:\n"
        "                said = print('ready', flush=True) or True\n"
        "            time.sleep(0.05)\n"
        "        except KeyboardInterrupt:\n"
        "            pass\n"
        "cli.main(['spin'])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        assert proc.stdout.readline() == "ready\n", proc.communicate()[1]
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: terminated (SIGTERM): the command did not stop within 1 s"), err
    assert "Traceback" not in err and time.monotonic() - start >= 1
