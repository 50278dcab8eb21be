"""What the experts train on (experts.expert_data / --expert-data), checked against the redistribution's own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plmtool.errors import PlmtoolError
from plmtool.experts import lora, run_train
from tests.conftest import one_thread
from tests.experts.test_experts_model import plmtool, small_redistribution

_one_thread = pytest.fixture(autouse=True)(one_thread)  # the tiny model trains fastest on one thread


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cluster_ids(d: Path) -> dict[int, list[str]]:
    """Reference: the pool ids of each cluster, straight from the manifest."""
    out: dict[int, list[str]] = {}
    for row in jsonl(d / "manifest.jsonl"):
        out.setdefault(row["cluster"], []).append(row["id"])
    return out


@pytest.fixture
def redistribution(tmp_path, tiny_llama_dir, monkeypatch):
    d, common = small_redistribution(tmp_path, tiny_llama_dir, monkeypatch)
    return d, [*common, f"experts.redistribution={d}", "trainer.batch_size=4", "experts.oracle=false"]


def record_training(monkeypatch, d: Path) -> dict[str, list[str]]:
    """{unit: ids of the samples it was trained on}, seen at the tokenizer (what each unit encodes before it trains)."""
    id_of = {json.dumps(s["messages"]): s["id"] for s in jsonl(d / "samples.jsonl")}
    seen: list[str] = []
    trained: dict[str, list[str]] = {}
    real_encode, real_train = run_train.encode, run_train.train_adapter

    def encode(tok, messages, *args):
        seen.append(id_of.get(json.dumps(messages), "held-out"))
        return real_encode(tok, messages, *args)

    def train_adapter(model, unit, enc, *args, **kwargs):
        trained[unit] = list(seen)
        seen.clear()
        return real_train(model, unit, enc, *args, **kwargs)

    monkeypatch.setattr(run_train, "encode", encode)
    monkeypatch.setattr(run_train, "train_adapter", train_adapter)
    return trained


def test_cluster_experts_train_on_exactly_their_whole_clusters(tmp_path, redistribution, monkeypatch, capsys):
    d, tr = redistribution
    clusters = cluster_ids(d)
    trained = record_training(monkeypatch, d)

    # the default: expert 0 as its own job, on its shard of the redistributed subset (as before)
    assert plmtool("experts", "train", "experiment=smoke", *tr, "experts.expert_index=0", f"hydra.run.dir={tmp_path / 'J'}") in (0, None)
    job = json.loads((tmp_path / "J" / "report.json").read_text())
    shard = [s["id"] for s in jsonl(d / "shards" / "expert_0.jsonl")]
    assert trained == {"expert_0": shard} and len(shard) < len(clusters[0])
    assert job["job"] == "expert_0" and job["expert_data"] == "redistributed"
    default_meta = (d / "adapters" / "expert_0" / "train.json").read_text()

    # whole clusters: every pool sample of cluster c, all experts together the full-data unit's samples
    trained.clear()
    e = tmp_path / "E"
    assert plmtool("experts", "train", "experiment=smoke", *tr, "experts.expert_data=cluster", "experts.baselines=[full]",
                   f"hydra.run.dir={e}") in (0, None)
    names = [f"expert_{c}_cluster" for c in sorted(clusters)]
    assert set(trained) == {"full", *names}
    for c, name in zip(sorted(clusters), names):
        assert sorted(trained[name]) == sorted(clusters[c]), name
    assert sorted(i for n in names for i in trained[n]) == sorted(trained["full"]) == sorted(s["id"] for s in jsonl(d / "samples.jsonl"))
    rep = json.loads((e / "report.json").read_text())
    assert rep["expert_data"] == "cluster"
    assert rep["expert_samples"] == {n: len(clusters[c]) for c, n in zip(sorted(clusters), names)}
    assert all(rep["train"][n]["samples"] == len(clusters[c]) for c, n in zip(sorted(clusters), names))
    assert "(experts.expert_data=cluster); samples: expert_0_cluster " in (e / "report.md").read_text()
    # both kinds side by side: the default expert's adapter is untouched
    assert (d / "adapters" / "expert_0" / "train.json").read_text() == default_meta

    # assembling never takes the other kind: the default experts 1.. are missing, the cluster ones are all there
    trained.clear()
    assemble = ["experts", "train", "experiment=smoke", *tr, "experts.baselines=[full]", "experts.mode=assemble"]
    capsys.readouterr()
    assert plmtool(*assemble, f"hydra.run.dir={tmp_path / 'A0'}") == 2
    assert "adapter 'expert_1'" in capsys.readouterr().err
    assert plmtool(*assemble, "experts.expert_data=cluster", f"hydra.run.dir={tmp_path / 'A1'}") in (0, None)
    again = json.loads((tmp_path / "A1" / "report.json").read_text())
    assert again["eval"]["routed_cluster"]["loss"] == pytest.approx(rep["eval"]["routed_cluster"]["loss"], rel=1e-6) and trained == {}


def test_unknown_expert_data_is_one_clear_error(tmp_path, capsys):
    assert plmtool("experts", "train", "experts.expert_data=whole", f"experts.redistribution={tmp_path / 'nope'}",
                   f"hydra.run.dir={tmp_path / 'E'}") == 2
    assert "unknown experts.expert_data 'whole' (choose from redistributed, cluster, both)" in capsys.readouterr().err
    from plmtool.experts.routed import load_routed

    with pytest.raises(PlmtoolError, match="unknown expert_data 'whole'"):
        load_routed(str(tmp_path / "nope"), None, expert_data="whole")


