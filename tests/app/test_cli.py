"""The command line as a user meets it: every usage mistake is one line and exit 2 (never a
traceback), one flag vocabulary across commands, output files by extension, user text printed
literally, and a runtime-only install (no torch, no click) that starts the CLI and classifies."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from diffscore.app.digits import CLASS_NAMES, load_digits_split

LABELS = ",".join(CLASS_NAMES)
# one backend everywhere: auto measures and may pick openvino on another CPU (these tests are not about backends)
FAST = ["--stages", "2:1", "--backend", "ort-cpu"]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    for i, img in enumerate(load_digits_split().test_images[:3]):
        Image.fromarray(img).save(folder / f"d{i}.png")
    return folder


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "diffscore.app.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


USAGE_MISTAKES = [
    ["nosuch"],
    ["classify"],
    ["classify", "{engine}"],
    ["classify", "{engine}", "{images}", "--limit", "abc"],
    ["classify", "{engine}", "{images}", "--labels", "a,b", "--backend", "gpu9"],
    ["classify", "{engine}", "{images}", "--labels", "a,b", "--precision", "fp8"],
    ["classify", "{engine}", "{images}", "--labels", "a,b", "--format", "yaml"],
    ["classify", "{engine}", "{images}", "--labels", "a,b", "--loss", "l3"],
    ["classify", "{engine}", "{images}", "--labels", "a,b", "--method", "knn"],
    ["classify", "{engine}", "{images}", "--labels", "a,b", "--seed", "-1"],
    ["classify", "{engine}", "{images}", "--labels", "a,b", "--batch-size", "0"],
    ["match", "{engine}", "{images}", "--text", "a", "--timesteps", "0"],
    ["demo", "--limit", "-1"],
    ["demo", "--limit", "abc"],
    ["export", "{engine}"],
    ["calibrate", "{engine}", "--demo", "--samples", "0"],
    ["train-head", "{engine}", "--kind", "knn"],
    ["info", "{engine}", "--format", "xml"],
    ["parity", "{engine}", "--limit", "-3"],
    ["classify", "{engine}", "{images}", "--labels", "a", "--labels-file", "{images}/d0.png"],
    ["classify", "{engine}", "{images}", "--labels", "a,b", "--stages", "10:0"],
    ["match", "{engine}", "{images}"],
    ["export", "{engine}", "{images}/e", "--precision", "int8"],
]


@pytest.mark.parametrize("args", USAGE_MISTAKES, ids=lambda a: " ".join(a))
def test_usage_mistakes_are_one_line_exit_2(run_cli, demo_engine, digits_dir, args):
    code, err = run_cli(*[a.format(engine=demo_engine, images=digits_dir) for a in args])
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


WORK_MISTAKES = [
    (["classify", "{engine}", "{images}/nothing*.png", "--labels", "a,b"], "no image files match"),
    (["classify", "{engine}", "{images}", "--labels", "a,b", "-o", "{tmp}/r.yaml"], "unknown extension '.yaml'"),
    (["classify", "{engine}", "{images}", "--labels", "a,b", "-o", "{tmp}/no/r.json"], "does not exist"),
    (["classify", "{engine}", "{images}", "--labels-file", "{tmp}/latin1.txt"], "is not UTF-8"),
]


@pytest.mark.parametrize("args,message", WORK_MISTAKES, ids=lambda a: " ".join(a) if isinstance(a, list) else a)
def test_mistakes_found_while_working_are_one_line_exit_1(run_cli, demo_engine, digits_dir, tmp_path, args, message):
    (tmp_path / "latin1.txt").write_bytes("café\nthé\n".encode("latin-1"))
    code, err = run_cli(*[a.format(engine=demo_engine, images=digits_dir, tmp=tmp_path) for a in args])
    assert code == 1 and "Traceback" not in err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_version_and_help():
    import diffscore

    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"diffscore {diffscore.__version__}"
    proc = cli()
    assert proc.returncode == 0 and "classify" in proc.stdout and "Usage" in proc.stdout


def test_images_as_folders_and_globs_and_output_files(demo_engine, digits_dir, tmp_path):
    (tmp_path / "labels.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    by_folder = cli("classify", demo_engine, digits_dir, "--labels", LABELS, *FAST, "-f", "json")
    by_glob = cli("classify", demo_engine, f"{digits_dir}/d*.png", "--labels-file", tmp_path / "labels.txt", *FAST,
                  "-f", "json", "-o", tmp_path / "r.jsonl")
    assert by_folder.returncode == 0 and by_glob.returncode == 0, by_folder.stderr + by_glob.stderr
    rows = json.loads(by_folder.stdout)
    assert [r["image"] for r in rows] == [str(digits_dir / f"d{i}.png") for i in range(3)]
    assert [r["label"] for r in rows] == [r["label"] for r in json.loads(by_glob.stdout)]
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert [json.loads(x)["label"] for x in lines] == [r["label"] for r in rows]
    assert rows[0]["options"]["backend"] == "ort-cpu" and rows[0]["options"]["stages"] == [[2, 1]]
    proc = cli("classify", demo_engine, digits_dir, "--labels", LABELS, *FAST, "-o", tmp_path / "r.csv")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r.csv").read_bytes().startswith(b"\xef\xbb\xbfimage,")  # a BOM: spreadsheets read UTF-8
    with open(tmp_path / "r.csv", encoding="utf-8-sig") as f:
        table = list(csv.DictReader(f))
    assert [r["label"] for r in table] == [r["label"] for r in rows]
    ranking = [entry[:2] for entry in rows[0]["ranking"]]  # one column per rank, its score beside it
    assert [[table[0][f"rank{i}"], float(table[0][f"rank{i} score"])] for i in range(1, 11)] == ranking
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def test_user_text_is_printed_literally(demo_engine, digits_dir):
    labels = "[/x],[red]zero[/red],[link=http://example.com]one[/link]"
    proc = cli("classify", demo_engine, digits_dir / "d0.png", "--labels", labels, *FAST)
    assert proc.returncode == 0, proc.stderr
    assert any(x in proc.stdout for x in ("[/x]", "[red]zero[/red]", "[link=http://example.com]one[/link]"))
    proc = cli("classify", demo_engine, "[bold]missing[/bold].png", "--labels", "a,b")
    assert proc.returncode == 1 and "[bold]missing[/bold].png" in proc.stderr


def test_info_json(demo_engine):
    proc = cli("info", demo_engine, "--format", "json", "--verify")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["verified"] is True and set(record["graphs"]) >= {"text_encoder", "unet", "unet.fp16"}


def test_choices_match_the_stages_that_own_them():
    from diffscore.app import cli as app_cli
    from diffscore.calibration.quantize import METHODS
    from diffscore.reference.heads import HEAD_KINDS

    assert tuple(k.value for k in app_cli.HeadKind) == HEAD_KINDS
    assert tuple(m.value for m in app_cli.RangeMethod) == METHODS


def test_runtime_only_install_starts_the_cli_and_classifies(demo_engine, digits_dir):
    """torch, diffusers, transformers and a standalone click are blocked: the runtime CLI still works."""
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'diffusers', 'transformers', 'click', 'sklearn'):
                    raise ImportError('blocked in this test: ' + name)
        sys.meta_path.insert(0, Block())
        from diffscore.app.cli import main
        main(['classify', {str(demo_engine)!r}, {str(digits_dir)!r}, '--labels', 'zero,one,two', '--stages', '2:1',
              '-f', 'json'])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(json.loads(proc.stdout)) == 3
