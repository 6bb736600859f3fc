"""Packaging: the distribution's name and extras, a core-only environment that trains, optional
dependencies imported lazily, library code that logs instead of printing, readable file sizes."""
import ast
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import tomllib

import pytest

from c2f.app.data import synthesize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_classes=4, images_per_class=8, num_attributes=6, dim=16, grid=4, num_locations=3,
             test_fraction=0.25, classes_per_genus=1, shard_size=16, progress=False)
OPTIONAL = ("matplotlib", "PIL", "triton", "safetensors", "tensorboard", "timm", "torchvision")
TRAIN_SCRIPT = """
import sys
from c2f.app.cli import main
code = main(["train", "--features", sys.argv[1], "--run-dir", sys.argv[2], "--epochs", "1", "--batch-size", "4",
             "--num-workers", "0", "--no-progress", "--plots", "--val-fraction", "0.25"])
import c2f.nn  # noqa: F401
loaded = sorted(m for m in {name.split(".")[0] for name in sys.modules if sys.modules[name] is not None}
                if m in {OPTIONAL})
print("LOADED", loaded)
raise SystemExit(code)
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthesize(str(tmp_path_factory.mktemp("small") / "cache"), **SMALL)


def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def names(requirements):
    return {re.match(r"[A-Za-z0-9_.\-]+", r).group(0).lower() for r in requirements}


def compat_pair() -> dict[str, str]:
    """The oldest supported torch and Triton, as the Makefile's test-compat target installs them."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        text = f.read()
    pins = dict(re.findall(r"^COMPAT_(TORCH|TRITON) \?= \S+==(\S+)$", text, re.M))
    assert set(pins) == {"TORCH", "TRITON"}, pins
    return {"torch": pins["TORCH"].removesuffix(".0"), "triton": pins["TRITON"].removesuffix(".0")}


def test_distribution_name_core_and_extras():
    project = pyproject()
    assert project["name"] == "c2f-fgvc" and project["scripts"]["c2f"] == "c2f.app.cli:main"
    assert names(project["dependencies"]) == {"torch", "numpy", "tqdm"}
    # The lower bounds are the oldest pair `make test-compat` runs the suite on.
    oldest = compat_pair()
    assert f"torch>={oldest['torch']}" in project["dependencies"]
    extras = project["optional-dependencies"]
    assert {"triton", "gpu", "plots", "extract", "tensorboard", "safetensors", "test", "bench", "all"} <= set(extras)
    (triton,) = extras["triton"]
    assert triton.startswith(f"triton>={oldest['triton']},<4"), triton
    assert names(extras["plots"]) == {"matplotlib"} and names(extras["extract"]) == {"pillow"}


def run_train(python, cache, run_dir):
    script = TRAIN_SCRIPT.replace("{OPTIONAL}", repr(set(OPTIONAL)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(OMP_NUM_THREADS="1")
    return subprocess.run([python, "-c", script, cache, run_dir], capture_output=True, text=True, timeout=300,
                          env=env, cwd=os.path.dirname(run_dir))


def _requirements(dist: str, seen: set) -> None:
    """``dist`` and what it needs (extras and packages not installed here left out), by name, into ``seen``."""
    key = dist.lower().replace("_", "-")
    if key in seen:
        return
    try:
        requires = metadata.distribution(dist).requires or []
    except metadata.PackageNotFoundError:
        return
    seen.add(key)
    for req in requires:
        if "extra ==" not in req:
            _requirements(re.match(r"[A-Za-z0-9_.\-]+", req).group(0), seen)


def test_a_core_only_environment_imports_c2f_nn_and_trains(cache, tmp_path):
    """A virtual environment holding only torch, numpy, tqdm and what they need (linked from this one, so no
    download), with c2f on its path: no optional package is installed (matplotlib included), or imported."""
    env = tmp_path / "core-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([str(env / "bin" / "python"), "-c", purelib],
                          capture_output=True, text=True, check=True).stdout.strip()
    dists, torch_own = set(), set()
    for core in ("torch", "numpy", "tqdm"):
        _requirements(core, dists)
    _requirements("torch", torch_own)   # a CUDA build of torch needs triton itself: not c2f's doing
    assert {"torch", "numpy", "tqdm"} <= dists and not dists & ({"matplotlib", "pillow", "triton"} - torch_own)
    for name in dists:
        dist = metadata.distribution(name)
        tops = {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = os.path.join(str(dist.locate_file("")), top)
            if os.path.exists(source) and not os.path.exists(os.path.join(site, top)):
                os.symlink(source, os.path.join(site, top))
    with open(os.path.join(site, "c2f-source.pth"), "w") as f:
        f.write(ROOT + "\n")
    run = str(tmp_path / "run")
    proc = run_train(str(env / "bin" / "python"), cache, run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # torch's compile machinery imports triton where torch itself depends on it (CUDA builds): only there
    # may it show; the CPU build of the default venv holds c2f to no optional import at all.
    loaded = set(ast.literal_eval(proc.stdout.split("LOADED ", 1)[1].splitlines()[0]))
    assert not loaded - ({"triton"} & torch_own) and "held-out test split" in proc.stdout, proc.stdout[-2000:]
    # Without matplotlib the run completes, and says in one line which extra adds the plots.
    notes = [ln for ln in proc.stderr.splitlines() if "matplotlib" in ln]
    assert notes == ["warning: plots skipped: matplotlib is not installed (pip install 'c2f-fgvc[plots]' adds them)"]
    assert os.path.isfile(os.path.join(run, "final.json")) and os.path.isfile(os.path.join(run, "best.pt"))
    assert not [f for f in os.listdir(run) if f.endswith(".png")]


@pytest.mark.venv
@pytest.mark.timeout(1800)   # venv, two pip installs and a training run: its own steps allow 1620 s
@pytest.mark.skipif(os.environ.get("C2F_TEST_VENV") != "1", reason="builds a venv with pip: opt-in, C2F_TEST_VENV=1")
def test_a_fresh_pip_venv_with_the_core_install_trains(cache, tmp_path):
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=120)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True, timeout=600)
    subprocess.run(pip + [ROOT], check=True, timeout=600)
    proc = run_train(str(env / "bin" / "python"), cache, str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout


def library_files():
    for folder, _, files in os.walk(os.path.join(ROOT, "c2f")):
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def test_library_code_logs_and_the_cli_owns_stdout():
    printing = []
    for path in library_files():
        if os.sep + "cli" + os.sep in path:
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        printing += [f"{os.path.relpath(path, ROOT)}:{node.lineno}" for node in ast.walk(tree)
                     if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"]
    assert printing == []


def test_no_source_file_over_400_lines():
    long = {os.path.relpath(p, ROOT): n for p in library_files() if (n := len(open(p).read().splitlines())) > 400}
    assert long == {}


def test_readme_documents_the_commands_and_extras():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for text in ("c2f info", "c2f eval", "c2f predict", "c2f runs", "--resume", "--config", "--amp",
                 "pip install 'c2f-fgvc[", "[plots]", "[extract]", "[triton]", "--skip-nonfinite"):
        assert text in readme, text


def test_the_library_sits_at_the_top_and_the_application_in_c2f_app():
    """At most 16 modules directly in c2f/; none but ``python -m c2f`` imports the application (c2f.app)."""
    top = sorted(f for f in os.listdir(os.path.join(ROOT, "c2f")) if f.endswith(".py"))
    assert len(top) <= 16, top
    for f in set(top) - {"__main__.py"}:
        tree = ast.parse(open(os.path.join(ROOT, "c2f", f)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                name = ("." * node.level) + (node.module or "")
                assert not re.match(r"^(\.app|c2f\.app)\b", name), f"c2f/{f} imports {name}"
                if node.level == 1 and node.module is None:
                    assert "app" not in [a.name for a in node.names], f"c2f/{f} imports the application"


@pytest.mark.parametrize("old, new, name", [("c2f.train", "c2f.app", "TrainConfig"),
                                            ("c2f.data.cache", "c2f.app.data.cache", "FeatureCache"),
                                            ("c2f.cli", "c2f.app.cli", "main"),
                                            ("c2f.head", "c2f.c2f_head", "C2FHead"),
                                            ("c2f.checkpoint", "c2f.model_file", "load_model")])
def test_modules_moved_in_0_2_import_under_their_old_name_with_a_deprecation_warning(old, new, name):
    code = (f"import warnings; warnings.simplefilter('always')\n"
            f"with warnings.catch_warnings(record=True) as w:\n"
            f"    warnings.simplefilter('always')\n"
            f"    from {old} import {name} as a\n"
            f"from {new} import {name} as b\n"
            f"assert a is b, (a, b)\n"
            f"msgs = [str(x.message) for x in w if x.category is DeprecationWarning]\n"
            f"assert any('{old} is now {new}' in m for m in msgs), msgs\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _long_functions(limit: int = 80) -> list[str]:
    """Functions over ``limit`` lines in c2f/, kernels/, bench/ and tests/, Triton kernels (@triton.jit) aside."""
    found = []
    for top in ("c2f", "kernels", "bench", "tests"):
        for root, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(root, f)
                for node in ast.walk(ast.parse(open(path).read())):
                    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                        continue
                    if any("triton.jit" in ast.unparse(d) for d in node.decorator_list):
                        continue
                    if node.end_lineno - node.lineno + 1 > limit:
                        found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}")
    return found


def test_no_function_over_80_lines_but_triton_kernels():
    assert _long_functions() == []
    assert _long_functions(limit=30), "the scan must see long functions"   # the check can fail
