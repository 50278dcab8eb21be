"""On the real embedded SmolLM2-135M at 2:4 (small calibration): Wanda clearly beats magnitude and
SDS beats its own one-shot start."""

from __future__ import annotations

import copy
from dataclasses import replace
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
    from plmtool.prune.config import OptimConfig, PruneConfig, SdsConfig
    from plmtool.prune.oneshot import prune_model
    from plmtool.prune.sds import linear_weights, redense_model, reprune_model

    base, calib, ev = setup
    sds = SdsConfig(redense=OptimConfig(iterations=10, lr=0.01), adjust=OptimConfig(iterations=10, lr=0.05), early_exit=False)
    opts = PruneConfig(method="wanda", pattern="2:4", batch_size=4, sds=sds)
    mag = copy.deepcopy(base)
    prune_model(mag, None, replace(opts, method="magnitude"))
    ppl_mag = _ppl(mag, ev)
    del mag

    model = copy.deepcopy(base)
    dense = linear_weights(model)
    prune_model(model, calib, opts)
    ppl_wanda = _ppl(model, ev)
    assert ppl_wanda < 0.5 * ppl_mag, (ppl_wanda, ppl_mag)

    oneshot = linear_weights(model)
    redense_model(model, calib, dense, opts)
    res = reprune_model(model, calib, dense, oneshot, opts)
    ppl_sds = _ppl(model, ev)
    assert ppl_sds < 0.95 * ppl_wanda, (ppl_sds, ppl_wanda)
    assert all(v["final"] <= v["oneshot"] + 1e-9 for v in res["layers"].values())
