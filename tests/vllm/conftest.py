"""Shared setup of the vLLM tests (``pytest -m vllm tests/vllm`` in the vLLM environment; see ``.ci/vllm.sh``).

Every test module here starts with ``pytest.importorskip("vllm.sampling_params")`` (a plain
``importorskip("vllm")`` would accept this very folder, which Python can import as a namespace
package ``vllm`` when ``tests/`` is on ``sys.path``), so the default test suite
(no vLLM installed) skips them. Engines run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
uni-process executor), eager, float32; a start takes 35-70 s on a small CPU, so the offline,
load and classifier modules share ONE engine (:func:`shared_llm`), and the served and
tensor-parallel modules start one each.
"""

from __future__ import annotations

import os

for _name, _value in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)

import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def model_folder() -> str:
    """The embedded SmolLM2 as a folder vLLM loads (``model.embed_tokens.weight`` present)."""
    from guidance.vllm.models import default_model_folder

    return str(default_model_folder())


def make_llm(model_folder: str, **kwargs):
    """A float32, eager, in-process vLLM engine on the embedded model (test defaults, overridable)."""
    from vllm import LLM

    settings = dict(
        model=model_folder,
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        seed=0,
        distributed_executor_backend="uni",
    )
    settings.update(kwargs)
    return LLM(**settings)


def _engine_core(llm):
    return llm.llm_engine.engine_core.engine_core


@pytest.fixture(scope="session")
def build_llm(model_folder: str):
    """``build_llm(**kwargs)``: :func:`make_llm` on the embedded model (call it from a module-scoped fixture)."""
    return lambda **kwargs: make_llm(model_folder, **kwargs)


#: The shared engine's limits: 14 KV blocks of 32 tokens (one is vLLM's null block, so 416 tokens
#: for all running rows together) and 64 tokens per step, so that long prompts are prefilled in
#: chunks and growing rows preempt each other (tests/vllm/test_cfg_load.py relies on both).
SHARED_ENGINE = dict(max_model_len=384, block_size=32, num_gpu_blocks_override=14, max_num_batched_tokens=64,
                     max_num_seqs=8)


@pytest.fixture(scope="session")
def shared_llm(build_llm):
    """One engine with every processor of guidance.vllm (CFG pairs, typical_p, classifier) and small limits."""
    import guidance.vllm as gv
    from guidance.vllm.classifier import ClassifierLogitsProcessor

    return build_llm(**SHARED_ENGINE, **gv.engine_kwargs(classifier=ClassifierLogitsProcessor))


@pytest.fixture(scope="session")
def engine_core():
    """``engine_core(llm)``: the in-process engine core, to inspect its scheduler (test-only)."""
    return _engine_core
