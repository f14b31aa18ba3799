"""Pushing checkpoints to the Hugging Face Hub: ``push_folder``, background checkpoint pushes, ``hf-scfm push``.

Everything goes through the real ``huggingface_hub`` client (``HfApi.create_repo`` + ``HfApi.upload_folder``),
so authentication (``HF_TOKEN`` or ``hf auth login``), ``HF_ENDPOINT`` mirrors, LFS/Xet transfer and retries
behave exactly as they do for ``model.push_to_hub``.

Choices, and why:

* **Validate before uploading.** A push that silently ships a half-written checkpoint costs a user far more
  than a clear local error, so :func:`validate_checkpoint` checks that the folder is complete (``config.json``
  with a ``model_type``; ``model.safetensors``, or a sharded index whose every shard exists and holds every tensor
  it maps; or a PEFT adapter; the tokenizer's ``tokenizer_config.json``) and that each safetensors file is whole
  (its header parses and the byte ranges it declares fit in the file) -- without loading a single tensor.
* **No pickle leaves the machine.** ``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl`` and the training-state files that
  ``accelerate``/``Trainer`` write next to a checkpoint (optimizer, scheduler, RNG states) are never uploaded: the
  Hub copy is for loading with ``from_pretrained``; resuming uses the local state.
* **Snapshot, then upload in the background.** :class:`CheckpointPusher` copies the checkpoint into a private
  staging folder (hard links: instant, no extra disk) before queueing the upload on ``HfApi``'s single background
  worker (``run_as_future``), so training keeps going and a checkpoint rotated away (``save_total_limit``) while
  its upload is queued still uploads whole. Pushes run one at a time, in order. The training loop must write each
  save to a new ``checkpoint-N`` folder (as ``Trainer`` does); any byte changed under a queued upload is caught
  by the SHA-256 check on the server side.
* **A model card always travels.** When the folder has no ``README.md``, one is rendered from its
  ``config.json`` and tokenizer settings (:mod:`hf_scfm.training.model_card`) into the staging copy; the user's
  folder is never modified.

Metrics travel too: :func:`push_metric` uploads one of the ``evaluate`` modules of :mod:`hf_scfm.metrics` to a Hub
metric repository (a Space, as ``evaluate-cli create`` makes them: the module as ``<name>.py``, a ``README.md`` from
its description, an ``app.py`` widget, ``requirements.txt``), after which ``evaluate.load("<org>/<name>")`` loads it
anywhere.

``hub_strategy`` follows ``transformers.TrainingArguments``: ``"every_save"`` pushes every save (here to a
``checkpoint-N/`` folder of the repo, so earlier checkpoints stay loadable with ``subfolder=``) and the final
model to the repo root; ``"end"`` pushes only the final model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
from concurrent.futures import Future
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HUB_STRATEGIES = ("every_save", "end")

#: Never uploaded: pickled weights and training state (see the module docstring).
NEVER_PUSHED = [
    "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt",
    "optimizer*", "scheduler*", "random_states*", "rng_state*", "scaler*",
    ".git/*", "__pycache__/*", "*.lock",
]

TOKENIZER_CONFIG = "tokenizer_config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class CheckpointError(ValueError):
    """A folder that is not a complete, loadable checkpoint."""


# ---------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str, fix: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} ({what}) is not valid JSON: {err}. {fix}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} ({what}) should hold a JSON object, found {type(data).__name__}. {fix}")
    return data


def safetensors_tensor_names(path: str | os.PathLike) -> list[str]:
    """Names of the tensors in a safetensors file, after checking the file is whole.

    Reads only the header: 8 bytes (little-endian header length), the JSON header, then checks that every
    tensor's ``data_offsets`` lies inside the data section actually present on disk. A truncated or overwritten
    file fails here with a :class:`CheckpointError` instead of deep inside ``from_pretrained``.
    """
    path = Path(path)
    fix = "The file is truncated or corrupt: save the model again (model.save_pretrained(folder))."
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is {size} bytes, too short to be a safetensors file. {fix}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: header declares {header_len} bytes but the file holds only {size - 8} after it. {fix}"
            )
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({err}). {fix}") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object. {fix}")
    data_size = size - 8 - header_len
    names = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: tensor {name!r} has no valid data_offsets. {fix}")
        if offsets[1] > data_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {offsets[1]} of the data section, which holds only "
                f"{data_size} bytes. {fix}"
            )
        names.append(name)
    return names


def validate_checkpoint(folder: str | os.PathLike, *, require_tokenizer: bool = True) -> dict[str, Any]:
    """Check that ``folder`` is a complete checkpoint that ``from_pretrained`` can load; raise if not.

    A complete checkpoint is either

    * a model: ``config.json`` (a JSON object with ``model_type``) and its weights as ``model.safetensors`` or as
      ``model.safetensors.index.json`` plus every shard it names, each shard holding the tensors mapped to it; or
    * a PEFT adapter: ``adapter_config.json`` and ``adapter_model.safetensors``;

    and, when ``require_tokenizer`` is true, the tokenizer saved beside it (``tokenizer_config.json``), because a
    single-cell checkpoint is useless without the gene vocabulary it was trained on.

    Returns a summary (``kind``, ``model_type``, ``weights``: list of weight files, ``config``) used to render the
    model card. Raises :class:`CheckpointError` naming the missing or broken file and how to fix it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder. Pass the folder written by save_pretrained.")
    files = {p.name for p in folder.iterdir() if p.is_file()}
    resave = f"Save it completely with model.save_pretrained({str(folder)!r}) (and tokenizer.save_pretrained)."

    if ADAPTER_CONFIG in files and "config.json" not in files:
        if ADAPTER_WEIGHTS not in files:
            raise CheckpointError(
                f"{folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}: the adapter checkpoint is partial. "
                "Save it again with peft_model.save_pretrained(folder)."
            )
        config = _read_json(folder / ADAPTER_CONFIG, "PEFT adapter config", resave)
        safetensors_tensor_names(folder / ADAPTER_WEIGHTS)
        summary = {"kind": "adapter", "model_type": None, "weights": [ADAPTER_WEIGHTS], "config": config}
    else:
        if "config.json" not in files:
            raise CheckpointError(f"{folder} has no config.json, so it is not a complete checkpoint. {resave}")
        config = _read_json(folder / "config.json", "model config", resave)
        if not config.get("model_type"):
            raise CheckpointError(f"{folder / 'config.json'} has no 'model_type'. {resave}")
        if SAFETENSORS in files:
            safetensors_tensor_names(folder / SAFETENSORS)
            weights = [SAFETENSORS]
        elif SAFETENSORS_INDEX in files:
            index = _read_json(folder / SAFETENSORS_INDEX, "sharded weights index", resave)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{folder / SAFETENSORS_INDEX} has no 'weight_map'. {resave}")
            weights = sorted(set(weight_map.values()))
            missing = [shard for shard in weights if shard not in files]
            if missing:
                raise CheckpointError(
                    f"{folder} is a partial sharded checkpoint: {SAFETENSORS_INDEX} names {len(weights)} shards "
                    f"but {missing} are missing. {resave}"
                )
            for shard in weights:
                present = set(safetensors_tensor_names(folder / shard))
                absent = [name for name, file in weight_map.items() if file == shard and name not in present]
                if absent:
                    raise CheckpointError(
                        f"{folder / shard} lacks tensors the index maps to it: {absent[:5]}"
                        f"{' ...' if len(absent) > 5 else ''}. {resave}"
                    )
            weights = [SAFETENSORS_INDEX, *weights]
        else:
            pickled = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl")))
            hint = (
                f" It holds pickled weights {pickled}, which hf-scfm never uploads: save with safetensors "
                "(save_pretrained does by default)." if pickled else ""
            )
            raise CheckpointError(
                f"{folder} has config.json but no weights ({SAFETENSORS} or {SAFETENSORS_INDEX}).{hint} {resave}"
            )
        summary = {"kind": "model", "model_type": config["model_type"], "weights": weights, "config": config}

    if require_tokenizer:
        if TOKENIZER_CONFIG not in files:
            raise CheckpointError(
                f"{folder} has no {TOKENIZER_CONFIG}: the tokenizer (gene vocabulary) was not saved with the model. "
                f"Run tokenizer.save_pretrained({str(folder)!r}), or pass require_tokenizer=False "
                "(--no-tokenizer) to push weights alone."
            )
        _read_json(folder / TOKENIZER_CONFIG, "tokenizer config", "Save the tokenizer again: tokenizer.save_pretrained.")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# staging and pushing
# ---------------------------------------------------------------------------------------------------------------


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _stage(folder: Path, *, card: bool, summary: dict | None, repo_id: str) -> Path:
    """A private snapshot of ``folder`` (hard links), with a rendered README.md when it lacks one."""
    staging = Path(tempfile.mkdtemp(prefix="hf-scfm-push-"))
    try:
        return _fill_staging(folder, staging / folder.name, card=card, summary=summary, repo_id=repo_id)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fill_staging(folder: Path, target: Path, *, card: bool, summary: dict | None, repo_id: str) -> Path:
    shutil.copytree(folder, target, copy_function=_link_or_copy)
    if card and not (target / "README.md").exists():
        from .model_card import FAMILIES, card_from_folder

        model_type = (summary or {}).get("model_type")
        if model_type is None and (folder / "config.json").exists():
            model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
        if model_type in FAMILIES:
            card_from_folder(folder, repo_id=repo_id, summary=summary).save(target / "README.md")
        else:  # not an hf-scfm family (e.g. a PEFT adapter or a foreign model): no card rather than a wrong one
            logger.info("No model card rendered for model_type %r (not an hf-scfm family).", model_type)
    return target


def _api(token: str | None):
    from huggingface_hub import HfApi

    return HfApi(token=token, library_name="hf-scfm")


def _prepare_repo(api, repo_id: str, *, private: bool, revision: str | None) -> str:
    """Create the repo (and branch) if missing; return the full repo id (a bare name gets the user's namespace)."""
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = url.repo_id
    if private:
        try:
            if not api.model_info(url.repo_id).private:
                logger.warning("%s already exists and is public; --private only applies to new repos.", repo_id)
        except Exception:  # best effort: visibility is reported, never enforced here
            pass
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    return repo_id


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    path_in_repo: str | None = None,
    token: str | None = None,
    validate: bool = True,
    require_tokenizer: bool = True,
    model_card: bool = True,
    run_as_future: bool = False,
    api=None,
):
    """Upload a saved model folder to the Hub repo ``repo_id`` in one commit and return the ``CommitInfo``.

    Creates the repo if needed (``private`` applies to new repos only) and the branch ``revision`` if it does not
    exist yet. The folder is validated first (:func:`validate_checkpoint`; ``validate=False`` skips it), pickled and
    training-state files are left out (:data:`NEVER_PUSHED`), and a model card is rendered when the folder has no
    ``README.md`` (``model_card=False`` disables that). ``path_in_repo`` uploads into a subfolder (e.g.
    ``checkpoint-500``). With ``run_as_future=True`` the folder is validated and snapshotted, and a
    ``concurrent.futures.Future`` returned at once; creating the repo/branch and the upload run on ``HfApi``'s
    background worker. ``api`` (an ``HfApi``) lets several background pushes share one worker, so they run in
    order (:class:`CheckpointPusher` does this); by default a new ``HfApi(token=token)`` is used.
    """
    folder = Path(folder)
    summary = validate_checkpoint(folder, require_tokenizer=require_tokenizer) if validate else None
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder. Pass the folder written by save_pretrained.")
    api = api if api is not None else _api(token)
    staged = _stage(folder, card=model_card and not path_in_repo, summary=summary, repo_id=repo_id)
    message = commit_message or (f"Upload {path_in_repo}" if path_in_repo else "Upload model with hf-scfm")

    def upload():
        try:
            full_id = _prepare_repo(api, repo_id, private=private, revision=revision)
            return api.upload_folder(
                repo_id=full_id,
                folder_path=staged,
                path_in_repo=path_in_repo,
                commit_message=message,
                revision=revision,
                repo_type="model",
                ignore_patterns=list(NEVER_PUSHED),
            )
        finally:
            shutil.rmtree(staged.parent, ignore_errors=True)

    if run_as_future:
        return api.run_as_future(upload)
    return upload()


class CheckpointPusher:
    """Pushes checkpoints during training without blocking it, with ``Trainer``-like ``hub_strategy``.

    >>> pusher = CheckpointPusher("org/my-model", hub_strategy="every_save")
    >>> pusher.on_save("out/checkpoint-500", step=500)   # returns at once; uploads to checkpoint-500/
    >>> pusher.finish("out/final")                         # final model to the repo root, waits for all pushes

    ``on_save`` validates the checkpoint *before* returning (a broken save fails the run at once, not minutes
    later in a background thread), snapshots it, and queues the upload. ``wait()`` blocks until every queued
    push is done and re-raises the first failure. ``require_tokenizer`` defaults to ``False`` for intermediate
    checkpoints (training loops often save the tokenizer once, at the end) and the final push always requires it.
    """

    def __init__(
        self,
        repo_id: str,
        *,
        hub_strategy: str = "every_save",
        private: bool = False,
        revision: str | None = None,
        token: str | None = None,
        require_tokenizer: bool = False,
    ):
        if hub_strategy not in HUB_STRATEGIES:
            raise ValueError(f"hub_strategy must be one of {HUB_STRATEGIES}, got {hub_strategy!r}.")
        self.repo_id, self.hub_strategy = repo_id, hub_strategy
        self.private, self.revision, self.token = private, revision, token
        self.require_tokenizer = require_tokenizer
        self.api = _api(token)  # one HfApi => one background worker => pushes run one at a time, in order
        self.futures: list[Future] = []

    def on_save(self, folder: str | os.PathLike, step: int) -> Future | None:
        """Queue the push of ``folder`` to ``checkpoint-{step}/`` (``every_save``); a no-op for ``end``."""
        if self.hub_strategy != "every_save":
            return None
        future = push_folder(
            folder, self.repo_id, private=self.private, revision=self.revision, token=self.token,
            path_in_repo=f"checkpoint-{step}", require_tokenizer=self.require_tokenizer,
            commit_message=f"Training in progress, step {step}", run_as_future=True, api=self.api,
        )
        self.futures.append(future)
        return future

    def finish(self, folder: str | os.PathLike, *, commit_message: str = "End of training", blocking: bool = True):
        """Push the final model folder to the repo root; with ``blocking`` wait for all pushes and return them."""
        future = push_folder(
            folder, self.repo_id, private=self.private, revision=self.revision, token=self.token,
            commit_message=commit_message, run_as_future=True, api=self.api,
        )
        self.futures.append(future)
        return self.wait() if blocking else future

    def wait(self) -> list:
        """Block until every queued push is done; return their ``CommitInfo`` or raise the first error."""
        results, first_error = [], None
        for future in self.futures:
            try:
                results.append(future.result())
            except Exception as err:  # keep waiting for the others, then raise
                first_error = first_error or err
        if first_error is not None:
            raise RuntimeError(f"A push to {self.repo_id} failed: {first_error}") from first_error
        return results


# ---------------------------------------------------------------------------------------------------------------
# metrics as Hub metric repositories
# ---------------------------------------------------------------------------------------------------------------

_METRIC_APP = """import evaluate
from evaluate.utils import launch_gradio_widget

module = evaluate.load({repo_id!r})
launch_gradio_widget(module)
"""


def push_metric(name: str, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str | None = None, api=None):
    """Upload the shipped metric ``name`` (:data:`hf_scfm.metrics.METRICS`) to the Hub metric Space ``repo_id``.

    The Space holds what ``evaluate.load(repo_id)`` reads (``<repo name>.py``: the module unchanged, it imports
    nothing of hf_scfm) and what the Hub shows (``README.md`` with the metric's description, citation and inputs;
    ``app.py``, ``evaluate``'s Gradio widget; ``requirements.txt``). The repo's name is the module's file name, so it
    must be a Python identifier (e.g. ``your-org/cell_type_annotation``). Returns the ``CommitInfo``.
    """
    from huggingface_hub.utils import validate_repo_id

    from ..metrics import load, metric_path

    validate_repo_id(repo_id)
    module_name = repo_id.split("/")[-1]
    if not module_name.isidentifier():
        raise ValueError(f"repo_id {repo_id!r}: evaluate.load(repo_id) imports <repo name>.py, so the name must be a "
                         f"Python identifier (e.g. {repo_id.split('/')[0]}/{name}).")
    source = Path(metric_path(name)) / f"{name}.py"
    info = load(name)
    readme = "\n".join([
        "---",
        f"title: {module_name}",
        "tags:", "- evaluate", "- metric", "- single-cell", "- hf-scfm",
        "sdk: gradio", "app_file: app.py", "pinned: false",
        "---", "",
        f"# {module_name}", "",
        f"An `evaluate` metric of hf-scfm: `evaluate.load({repo_id!r})`.", "",
        "## Description", "", info.description.strip(), "",
        "## Inputs and outputs", "", "```", info.inputs_description.strip(), "```", "",
        "## Citation", "", "```bibtex", info.citation.strip(), "```", "",
    ])
    api = api if api is not None else _api(token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="space", space_sdk="gradio")
    with tempfile.TemporaryDirectory(prefix="hf-scfm-metric-") as tmp:
        folder = Path(tmp)
        shutil.copyfile(source, folder / f"{module_name}.py")
        (folder / "README.md").write_text(readme, encoding="utf-8")
        (folder / "app.py").write_text(_METRIC_APP.format(repo_id=url.repo_id), encoding="utf-8")
        (folder / "requirements.txt").write_text("evaluate\ndatasets\nscikit-learn\nscipy\nnumpy\n",
                                                 encoding="utf-8")
        return api.upload_folder(repo_id=url.repo_id, folder_path=folder, repo_type="space",
                                 commit_message=commit_message or f"Upload the {name} metric with hf-scfm")


# ---------------------------------------------------------------------------------------------------------------
# command line: hf-scfm push DIR --repo-id ORG/NAME [--private] [--revision REV]
# ---------------------------------------------------------------------------------------------------------------


def add_push_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``push`` subcommand to an ``argparse`` subparsers object; its handler is :func:`push_command`."""
    parser = subparsers.add_parser(
        "push",
        help="upload a saved model folder (model + tokenizer + card) to the Hugging Face Hub",
        description="Validate a folder written by save_pretrained and upload it to a Hub model repo in one commit. "
        "Uses your Hugging Face login (HF_TOKEN or `hf auth login`) and honours HF_ENDPOINT.",
    )
    parser.add_argument("folder", metavar="DIR", help="folder written by save_pretrained")
    parser.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="Hub model repo to push to")
    parser.add_argument("--private", action="store_true", help="create the repo as private (new repos only)")
    parser.add_argument("--revision", default=None, metavar="REV", help="branch to push to (created if missing)")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument("--no-tokenizer", action="store_true", help="allow a folder without a saved tokenizer")
    parser.add_argument("--no-card", action="store_true", help="do not render a model card when README.md is absent")
    parser.set_defaults(func=push_command)
    return parser


def push_command(args: argparse.Namespace) -> int:
    """Handler of ``hf-scfm push``: returns 0 on success, 1 (after a one-line error) on an incomplete folder."""
    try:
        info = push_folder(
            args.folder, args.repo_id, private=args.private, revision=args.revision,
            commit_message=args.commit_message, require_tokenizer=not args.no_tokenizer,
            model_card=not args.no_card,
        )
    except CheckpointError as err:
        print(f"hf-scfm push: error: {err}")
        return 1
    except Exception as err:  # HTTP errors (auth, permissions, network): one readable line, not a traceback
        from huggingface_hub.errors import HfHubHTTPError

        if not isinstance(err, HfHubHTTPError):
            raise
        print(f"hf-scfm push: error: the Hub refused the push to {args.repo_id}: {err}. "
              "Check your login (HF_TOKEN or `hf auth login`) and write access to the repo.")
        return 1
    print(f"Pushed {args.folder} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def push_main(argv: list[str] | None = None) -> int:
    """``hf-scfm push`` as a standalone entry point (``python -m hf_scfm.training.hub DIR --repo-id ORG/NAME``)."""
    parser = argparse.ArgumentParser(prog="hf-scfm")
    sub = parser.add_subparsers(dest="command", required=True)
    add_push_parser(sub)
    args = parser.parse_args(["push", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(push_main())
