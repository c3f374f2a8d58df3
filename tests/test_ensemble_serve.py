"""Serving an ensemble directory (`finegrain serve ENS`): the members' adapters on one base, their
probabilities averaged per request exactly as `finegrain.load(ENS)` does; listed as one model; a
run beside it; the one-line refusal of members that encode a text differently."""

import httpx
import pytest
import yaml

import finegrain
from finegrain.ensemble import create_ensemble
from finegrain.errors import FinegrainError
from finegrain.serve.models import ModelRegistry

from serve_helpers import Server
from test_ensemble import TEXTS, seed_members

KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def ensemble(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble-serve")
    _, members = seed_members(tiny_model_dir, root, (0, 1, 2))
    create_ensemble(members, root / "ens")
    return root / "ens", members


def test_served_ensemble_predicts_like_finegrain_load(ensemble):
    directory, members = ensemble
    server = Server([f"ens={directory}", f"alone={members[0]}"], env={"FINEGRAIN_API_KEYS": KEY})
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
            listed = {entry["id"]: entry for entry in client.get("/v1/models").json()["data"]}
            assert {"ens", "alone"} <= set(listed) and not any("#" in name for name in listed)  # members: not on their own
            assert listed["ens"]["labels"] == ["fresh", "rotten"] and len(listed["ens"]["members"]) == 3
            expected = finegrain.load(directory).predict(TEXTS)
            response = client.post("/v1/classify", json={"texts": TEXTS, "model": "ens"})
            assert response.status_code == 200, response.text
            served = response.json()["predictions"]
            assert [p["label"] for p in served] == [p["label"] for p in expected]
            for a, b in zip(served, expected):
                for label in ("fresh", "rotten"):
                    assert a["probabilities"][label] == pytest.approx(b["probabilities"][label], abs=1e-5)
            one = finegrain.load(members[0]).predict(TEXTS)  # the run beside it answers as itself
            alone = client.post("/v1/classify", json={"texts": TEXTS, "model": "alone"}).json()["predictions"]
            for a, b in zip(alone, one):
                assert [a["probabilities"][k] for k in b["probabilities"]] == pytest.approx(list(b["probabilities"].values()), abs=1e-5)
            assert any(a["probabilities"] != b["probabilities"] for a, b in zip(served, alone))
            member = client.post("/v1/classify", json={"texts": TEXTS, "model": "ens#1"})
            assert member.status_code == 404, member.text
    finally:
        assert server.stop() == 0, server.read_rest()[-3000:]


def test_members_that_encode_texts_differently_are_refused_in_one_line(ensemble, tmp_path):
    import shutil

    directory, members = ensemble
    longer = tmp_path / "longer"
    shutil.copytree(members[1], longer)
    spec = yaml.safe_load((longer / "config.yaml").read_text())
    spec["data"]["max_length"] = 32
    (longer / "config.yaml").write_text(yaml.safe_dump(spec))
    mixed = tmp_path / "mixed"
    shutil.copytree(directory, mixed)
    text = (mixed / "ensemble.json").read_text().replace(str(members[1].resolve()), str(longer.resolve()))
    (mixed / "ensemble.json").write_text(text)
    registry = ModelRegistry([("ens", directory)])
    assert list(registry.runs) == ["ens", "ens#1", "ens#2", "ens#3"]  # the ensemble first (the dashboard takes it)
    with pytest.raises(FinegrainError, match=r"mixed: its runs differ in data.max_length \(16, 32\)") as error:
        ModelRegistry([("mixed", mixed)])
    assert "\n" not in str(error.value)
    (mixed / "ensemble.json").write_text("{not json")
    with pytest.raises(FinegrainError, match=r"ensemble.json: not a readable ensemble"):
        ModelRegistry([("mixed", mixed)])
