"""On the real embedded SmolLM2-135M at 2:4 (small calibration): Wanda clearly beats magnitude and
SDS beats its own one-shot start."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.real_model

CALIB = SimpleNamespace(corpus="wiki_sample", calib_corpus=None, nsamples=16, seqlen=256, seed=0, text_field="text", cache_dir=None)


@pytest.fixture(scope="module")
def setup(smollm2):
    from plmtool.data.calibration import calibration_windows
    from plmtool.data.corpora import eval_tokens

    model, tok = smollm2
    calib = calibration_windows(tok, CALIB)
    ev = eval_tokens(tok, "wiki_sample", CALIB)
    return model, calib, ev


def _ppl(model, ev) -> float:
    from plmtool.eval.perplexity import perplexity

    return perplexity(model, ev, 256, max_tokens=4096)["ppl"]


def test_wanda_beats_magnitude_and_sds_beats_oneshot(setup):
    from plmtool.prune.oneshot import OneShotOptions, SparseGptOptions, prune_model
    from plmtool.prune.patterns import parse_pattern
    from plmtool.prune.sds import OptimOptions, SdsOptions, linear_weights, redense_model, reprune_model
    from plmtool.prune.sequential import WalkOptions

    base, calib, ev = setup
    pattern = parse_pattern("2:4")
    mag = copy.deepcopy(base)
    prune_model(mag, None, pattern, OneShotOptions(method="magnitude"))
    ppl_mag = _ppl(mag, ev)
    del mag

    model = copy.deepcopy(base)
    dense = linear_weights(model)
    walk = WalkOptions(batch_size=4)
    prune_model(model, calib, pattern, OneShotOptions(method="wanda", walk=walk))
    ppl_wanda = _ppl(model, ev)
    assert ppl_wanda < 0.5 * ppl_mag, (ppl_wanda, ppl_mag)

    oneshot = linear_weights(model)
    opts = SdsOptions(redense=OptimOptions(iterations=10, lr=0.01), adjust=OptimOptions(iterations=10, lr=0.05), early_exit=False)
    redense_model(model, calib, dense, opts, walk)
    res = reprune_model(model, calib, dense, oneshot, "wanda", pattern, opts, walk, SparseGptOptions())
    ppl_sds = _ppl(model, ev)
    assert ppl_sds < 0.95 * ppl_wanda, (ppl_sds, ppl_wanda)
    assert all(v["final"] <= v["oneshot"] + 1e-9 for v in res["layers"].values())
