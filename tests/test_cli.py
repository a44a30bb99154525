"""``fxpar plan MODULE:FACTORY`` and ``fxpar explain``: the user's own model from the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fxpar.__main__ import main

FACTORY = '''
from fxpar.models import MLP

def make(batch=16):
    model = MLP((16, 32, 8))
    return model, model.example_inputs(batch)

def wrong():
    return 3
'''


@pytest.fixture
def factory_dir(tmp_path, monkeypatch):
    (tmp_path / "userfactory.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_plan_prints_the_plan_and_writes_it(factory_dir, capsys):
    out = factory_dir / "plan.json"
    main(["plan", "userfactory:make", "--batch", "32", "--mesh", "2x2", "--out", str(out)])
    captured = capsys.readouterr()
    printed = captured.out
    assert "fxpar plan: mesh [2, 2]" in printed and "predicted step" in printed
    # progress of the long stages, on stderr
    assert "fxpar: capturing the training step of MLP ..." in captured.err
    assert "fxpar: solving (" in captured.err and "done in" in captured.err
    plan = json.loads(out.read_text())
    assert plan["mesh_shape"] == [2, 2]
    main(["explain", str(out)])
    assert "fxpar plan: mesh [2, 2]" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["plan", "userfactory:make", "--mesh", "2.5"], r"--mesh '2.5' is not a mesh shape"),
    (["plan", "userfactory"], r"'userfactory' is not MODULE:FACTORY"),
    (["plan", "nosuchmodule:make"], r"cannot import module 'nosuchmodule'"),
    (["plan", "userfactory:missing"], r"has no function 'missing'"),
    (["plan", "userfactory:wrong"], r"returned int; it must return \(model, example_inputs\)"),
    (["plan", "userfactory:make", "--cluster", "no-such-cluster"], r"neither a preset"),
    (["explain", "no-such-plan.json"], r"cannot read plan file"),
])
def test_bad_arguments_exit_with_an_fxpar_error(factory_dir, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "fxpar: error: PlanOptionError" in err
    assert __import__("re").search(message, err), err


def test_python_dash_m_fxpar_explain(factory_dir):
    out = factory_dir / "plan.json"
    main(["plan", "userfactory:make", "--mesh", "2", "--out", str(out)])
    done = subprocess.run([sys.executable, "-m", "fxpar", "explain", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fxpar plan: mesh [2]" in done.stdout
