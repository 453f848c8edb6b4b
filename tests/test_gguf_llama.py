"""llama.cpp itself runs the written GGUF (the optional extra ``abliterate[llama]``: llama-cpp-python): it loads the
file, and its last-position logits match the edited transformers model within the re-encoding error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_tiny import write_tiny_gguf

from abliterate.checkpoint.gguf_stream import write_plan_gguf
from abliterate.edit.direction_edit import DirectionEdit
from abliterate.edit.plan import apply_plan
from abliterate.lm.loading import load_model

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install 'abliterate[llama]'): llama.cpp check skipped"
)
TOKENS = [5, 70, 80, 90, 100, 33, 41, 7]


def llama_logits(path) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(TOKENS)
    return np.array(llm.scores[len(TOKENS) - 1], dtype=np.float32)


@pytest.mark.parametrize(("gguf_type", "bound"), [("F32", 0.02), ("auto", 0.25)])
def test_llama_cpp_runs_the_written_gguf(tmp_path, gguf_type, bound):
    """llama.cpp computes with the file's quantized tensors as they are (its dot products quantize the activations),
    so even the unedited file's logits differ from transformers' dequantized model: that difference is the floor.
    The written file may differ from the edited model by no more than the floor plus ``bound`` times the edit (F32:
    llama.cpp's arithmetic only; auto: plus the re-encoding error), and the change llama.cpp sees is the edit's."""
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    lm = load_model(str(src), dtype="float32")
    d = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(1))
    plan = DirectionEdit(d / d.norm(), None, 1.0, True, None, True).plan(lm)
    with torch.no_grad():
        base = lm.model(torch.tensor([TOKENS])).logits[0, -1].numpy()
        apply_plan(lm, plan, mode="weights")
        want = lm.model(torch.tensor([TOKENS])).logits[0, -1].numpy()
    written = write_plan_gguf(src, tmp_path / "out.gguf", plan, lm.hidden_size, gguf_type=gguf_type)
    got, got_base = llama_logits(written.path), llama_logits(src)
    edit = float(np.abs(want - base).max())
    floor = float(np.abs(got_base - base).max())
    assert edit > 10 * floor, "the edit must stand well above llama.cpp's own arithmetic for this test to mean much"
    assert float(np.abs(got - want).max()) < floor + bound * edit
    seen, made = got - got_base, want - base
    assert float(seen @ made / np.linalg.norm(seen) / np.linalg.norm(made)) > 0.95, "llama.cpp sees the edit"
