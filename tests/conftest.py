"""Shared pytest fixtures."""

from __future__ import annotations

import sys
import warnings

import pytest

_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _caller_of_warning_source() -> tuple[str, str, int] | None:
    """``(module, file, line)`` of the first frame outside the package that issued the warning being shown.

    Called from inside ``warnings.showwarning``: the innermost frames are the warnings machinery, then the frames
    of the package that warned (``transformers``: a deprecated method, a ``deprecate_kwarg`` wrapper...). The first
    frame of another package is the code that called the deprecated API."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("warnings", __name__):
        frame = frame.f_back
    if frame is None:
        return None
    source = frame.f_globals.get("__name__", "").split(".")[0]
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in (source, "functools", "contextlib"):
        frame = frame.f_back
    if frame is None:
        return None
    return frame.f_globals.get("__name__", ""), frame.f_code.co_filename, frame.f_lineno


@pytest.fixture(autouse=True)
def no_deprecated_calls_from_hf_scfm():
    """Fail a test in which hf_scfm itself calls a deprecated API of a dependency (transformers, peft, datasets,
    torch, ...). A deprecation is how a rename announces itself (transformers 5.24 renamed `cache_params` to
    `cache`): CI on the newest releases must fail on it, not a user's run after the removal. Deprecated calls made
    inside a dependency (peft calling transformers) are theirs and are let through."""
    ours: list[str] = []
    previous = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, _DEPRECATIONS):
            caller = _caller_of_warning_source()
            if caller is not None and caller[0].startswith("hf_scfm"):
                ours.append(f"{caller[1]}:{caller[2]}: {category.__name__}: {message}")
        return previous(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    try:
        yield
    finally:
        warnings.showwarning = previous
    if ours:
        pytest.fail("hf_scfm calls a deprecated API:\n" + "\n".join(dict.fromkeys(ours)), pytrace=False)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: on a shared 2-core machine two threads per process spin
    against each other (several times slower). Restores the previous count afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A local Hub (``tests/hub_server.py``) with the real ``huggingface_hub``/``transformers`` clients pointed at it.

    ``huggingface_hub`` reads its environment once, at import, into ``huggingface_hub.constants`` (and builds
    ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_URL_HOSTS``, the module-level ``HfApi`` used by ``huggingface_hub.create_repo``
    and friends, and ``utils._http._HUB_ORIGINS`` from it); ``transformers`` keeps one shared ``HfApi`` in
    ``transformers.utils.hub._hf_api`` built on first use. Setting ``HF_ENDPOINT`` alone is therefore not enough in
    a process that already imported them: this fixture sets the variables (for subprocesses and for code that reads
    them late) *and* patches those module-level copies, all undone by ``monkeypatch`` after the test. Caches
    (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_MODULES_CACHE``) go to the test's ``tmp_path``; the token is a dummy the
    server accepts; Xet is disabled (the server speaks the classic LFS protocol); telemetry is off.
    """
    import huggingface_hub.hf_api as hf_api_module
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    from hub_server import HubServer

    server = HubServer().start()
    endpoint = server.endpoint
    home = tmp_path / "hf_home"
    cache = home / "hub"
    modules = home / "modules"

    env = {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": server.token,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_MODULES_CACHE": str(modules),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)

    patches = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    if hasattr(_http, "_HUB_ORIGINS"):  # huggingface_hub >= 2.x keeps the allowed origins (private) here
        monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(endpoint)})
    monkeypatch.setattr(hf_api_module.api, "endpoint", endpoint)

    try:
        import transformers.utils.hub as tf_hub
        import transformers.dynamic_module_utils as tf_dynamic
    except ImportError:  # transformers is a dependency, but keep the fixture usable without it
        tf_hub = tf_dynamic = None
    if tf_hub is not None:
        monkeypatch.setattr(tf_hub, "_hf_api", None)  # rebuilt on first use, with the patched endpoint
        monkeypatch.setattr(tf_hub, "HF_MODULES_CACHE", str(modules))
        if hasattr(tf_dynamic, "HF_MODULES_CACHE"):
            monkeypatch.setattr(tf_dynamic, "HF_MODULES_CACHE", str(modules))

    yield server
    server.stop()


_HIDE_HF_SCFM = '''
import sys
class _HideHfScfm:
    """Meta-path finder placed first: hf_scfm (editable install, site-packages or the repo root) is not importable."""
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "hf_scfm" or name.startswith("hf_scfm."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None
sys.meta_path.insert(0, _HideHfScfm)
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
'''


@pytest.fixture
def python_without_hf_scfm(tmp_path):
    """Run Python code in a subprocess where ``hf_scfm`` cannot be imported (but torch, transformers and
    huggingface_hub can): ``run(code, timeout=120) -> subprocess.CompletedProcess`` (text, captured output). The
    interpreter runs isolated (``python -I``: no ``PYTHON*`` variables, no user site, no script folder on the path).

    The subprocess inherits the current environment, so inside a test that also uses ``hub_server`` it talks to
    the local Hub (``HF_ENDPOINT`` and friends are set before its interpreter starts). ``hf_scfm`` is hidden by a
    meta-path finder placed before every other (the editable install's finder included) and the subprocess
    runs in an empty folder, so only code that travels with a checkpoint (``trust_remote_code``) can define the
    hf-scfm classes there.
    """
    import subprocess
    import sys

    workdir = tmp_path / "no_hf_scfm"
    workdir.mkdir(exist_ok=True)

    def run(code: str, timeout: float = 120):
        return subprocess.run(
            [sys.executable, "-I", "-c", _HIDE_HF_SCFM + code],
            cwd=workdir, capture_output=True, text=True, timeout=timeout,
        )

    return run


def import_script(path, name: str):
    """Import a script that is not in a package (``benchmarks/*.py``) as module ``name``; a generator for a
    fixture: yields the module, then removes it from ``sys.modules``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)
