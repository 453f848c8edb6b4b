"""Hub upload (``run --push-to-hub``, ``abliterate push``) and the model card's hub metadata, against a stand-in
hub on 127.0.0.1 (tests/hubstub.py): no network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hubstub import HubStub
from huggingface_hub import ModelCard
from test_cli import invoke
from test_share import SMALL
from tiny import pretend_refusal, tiny_model, tiny_tokenizer

from abliterate.outputs.card import base_model_of, front_matter
from abliterate.outputs.manifest import MANIFEST, read_manifest
from abliterate.run.pipeline import known_models

BASE_CARD = "---\nlicense: mit\nlanguage: en\n---\n# tiny\n"


def error_lines(res) -> list[str]:
    return [line for line in res.output.splitlines() if line.startswith("error:")]


def one_line(res, code: int, *fragments: str) -> None:
    """Exit ``code`` with exactly one error line, the last line printed, holding every fragment."""
    assert res.exit_code == code, res.output
    lines = error_lines(res)
    assert len(lines) == 1 and res.output.strip().splitlines()[-1] == lines[0], res.output
    for fragment in fragments:
        assert fragment in lines[0], res.output


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The stand-in hub, with huggingface_hub pointed at plain LFS uploads and the stand-in's token in HF_TOKEN."""
    import huggingface_hub.constants as constants

    with HubStub() as stub, pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)  # hf_xet's storage protocol is not spoken by the stand-in
        mp.setattr(constants, "HF_TOKEN_PATH", str(tmp_path_factory.mktemp("hf") / "token"))  # no saved login
        mp.setenv("HF_TOKEN", stub.token)
        mp.delenv("HF_ENDPOINT", raising=False)
        yield stub


@pytest.fixture(scope="module")
def cached_model(tmp_path_factory):
    """A tiny model laid out like a hub cache snapshot of tiny-org/tiny-qwen, with the base model's card."""
    snapshot = tmp_path_factory.mktemp("cache") / "models--tiny-org--tiny-qwen" / "snapshots" / ("a" * 40)
    tiny_model("qwen2").save_pretrained(snapshot)
    tiny_tokenizer().save_pretrained(snapshot)
    (snapshot / "README.md").write_text(BASE_CARD)
    return snapshot


@pytest.fixture(scope="module")
def pushed(hub, cached_model, tmp_path_factory):
    """``run --as-adapter --push-to-hub me/tiny-lora --endpoint URL``: the issue's target journey."""
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("run") / "out"
    with pretend_refusal():
        res = invoke(
            "run",
            str(cached_model),
            "--out",
            str(out),
            *SMALL,
            "--no-search",
            "--as-adapter",
            "--push-to-hub",
            "me/tiny-lora",
            "--endpoint",
            hub.url,
        )
    assert res.exit_code == 0, res.output
    return out, res


def test_run_pushes_the_finished_folder(hub, pushed):
    out, res = pushed
    repo = hub.repos["me/tiny-lora"]
    assert repo.private is True and len(repo.commits) == 1
    assert repo.files == folder_files(out)  # every file, byte for byte, the manifest included
    assert {"adapter_model.safetensors", "README.md", MANIFEST} <= set(repo.files)
    assert any(m == "PUT" for m, _ in hub.requests)  # the safetensors went up as LFS objects
    assert f"uploaded {len(repo.files)} files to {hub.url}/me/tiny-lora (private)" in " ".join(res.output.split())
    assert invoke("verify", str(out)).exit_code == 0  # the upload changed nothing locally


def test_card_carries_hub_metadata(pushed):
    out, _ = pushed
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "tiny-org/tiny-qwen" and data["base_model_relation"] == "adapter"
    assert data["library_name"] == "peft" and data["license"] == "mit" and data["pipeline_tag"] == "text-generation"
    assert {"abliterate", "abliterated", "uncensored", "lora"} <= set(data["tags"])
    text = card.text
    for fragment in (
        "## Before / after",
        "| refusal rate on held-out harmful prompts (2) |",
        "## Evaluation contract",
        "at most 4 new tokens",
        "judge: marker",
        "abliterate reproduce",
        'PeftModel.from_pretrained(base, "THIS_FOLDER_OR_REPO")',
        'AutoModelForCausalLM.from_pretrained("tiny-org/tiny-qwen")',
    ):
        assert fragment in text, fragment
    assert "omitted" not in text  # the hub id was known


def test_push_command_honours_hf_endpoint_and_public(hub, pushed):
    out, _ = pushed
    res = invoke("push", str(out), "my-org/tiny-public", "--public", env={"HF_ENDPOINT": hub.url})
    assert res.exit_code == 0, res.output
    repo = hub.repos["my-org/tiny-public"]
    assert repo.private is False and repo.files == folder_files(out)
    res = invoke("push", str(out), "tiny-again", env={"HF_ENDPOINT": hub.url})  # NAME alone: under the user
    assert res.exit_code == 0 and hub.repos["me/tiny-again"].private is True, res.output
    res = invoke("push", str(out), "my-org/tiny-public", env={"HF_ENDPOINT": hub.url})
    assert res.exit_code == 0 and "existed already" in res.output and "(public)" in res.output, res.output
    assert hub.repos["my-org/tiny-public"].private is False  # an existing repo keeps its visibility


def test_failed_upload_keeps_the_folder(hub, pushed, tmp_path):
    out, _ = pushed
    before = folder_files(out)
    hub.fail[("POST", "/api/models/me/broken/commit")] = 500  # the LFS objects go up, then the commit fails
    try:
        res = invoke("push", str(out), "me/broken", "--endpoint", hub.url)
    finally:
        hub.fail.clear()
    one_line(res, 1, "upload to", "failed", "500", f"the local folder {out} is intact", "abliterate push")
    assert hub.repos["me/broken"].files == {} and folder_files(out) == before


def test_failed_upload_after_a_run_keeps_the_run(hub, cached_model, tmp_path):
    out = tmp_path / "out"
    hub.fail[("PUT", "/lfs/")] = 403  # half-way: the repo is created, README checked, then the first LFS PUT fails
    try:
        with pretend_refusal():
            res = invoke(
                "run", str(cached_model), "--out", str(out), *SMALL, "--no-search", "--push-to-hub", "me/half-way",
                "--endpoint", hub.url,
            )  # fmt: skip
    finally:
        hub.fail.clear()
    one_line(res, 1, "upload to", "failed", "403", "is intact")
    assert hub.repos["me/half-way"].files == {}
    assert invoke("verify", str(out)).exit_code == 0 and (out / "model.safetensors").is_file()
    card = ModelCard.load(out / "README.md").data.to_dict()
    assert card["library_name"] == "transformers" and card["base_model_relation"] == "finetune"


def test_apply_and_export_push_their_folders(hub, pushed, cached_model, tmp_path):
    out, _ = pushed
    directions = str(out / "directions.safetensors")
    hub_flags = ("--endpoint", hub.url)
    res = invoke("apply", str(cached_model), directions, "--out", str(tmp_path / "a"), "--push-to-hub", "me/applied",
                 *hub_flags)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert hub.repos["me/applied"].files == folder_files(tmp_path / "a") and hub.repos["me/applied"].private
    assert "model.safetensors" in hub.repos["me/applied"].files
    res = invoke("export", directions, "--format", "peft", "--model", str(cached_model), "--out", str(tmp_path / "e"),
                 "--push-to-hub", "me/exported", "--public", *hub_flags)  # fmt: skip
    assert res.exit_code == 0, res.output
    repo = hub.repos["me/exported"]
    assert repo.files == folder_files(tmp_path / "e") and "adapter_model.safetensors" in repo.files
    assert repo.private is False
    # a command that writes no folder has nothing to upload: refused before it starts
    res = invoke("apply", str(cached_model), directions, "--runtime-check", "hi", "--push-to-hub", "me/x", *hub_flags)
    one_line(res, 2, "pass --out DIR")
    res = invoke("export", directions, "--model", str(cached_model), "--out", str(tmp_path / "v.gguf"),
                 "--push-to-hub", "me/x", *hub_flags)  # fmt: skip
    one_line(res, 2, "use it with --format peft")
    res = invoke("apply", str(cached_model), directions, "--out", str(tmp_path / "b"), "--push-to-hub", "me/x/y")
    one_line(res, 2, "is not a hub repo id")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "e"] and "me/x" not in hub.repos


@pytest.mark.parametrize(
    ("repo_id", "env", "fragments"),
    [
        ("me//bad", {}, ("'me//bad' is not a hub repo id",)),
        ("me/bad--name", {}, ("is not a hub repo id",)),
        ("someone-else/model", {}, ("the token belongs to me, who cannot write to 'someone-else'",)),
        ("me/model", {"HF_TOKEN": ""}, ("no Hugging Face token", "HF_TOKEN", "hf auth login")),
        ("me/model", {"HF_TOKEN": "hf_wrong"}, ("refused the Hugging Face token (401)",)),
    ],
)
def test_bad_hub_input_fails_before_loading(hub, tmp_path, repo_id, env, fragments):
    """Checked before anything else: the model does not even exist, and nothing is written."""
    args = ("run", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out"), "--push-to-hub", repo_id)
    one_line(invoke(*args, "--endpoint", hub.url, env=env), 2, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_bad_push_input(hub, pushed, tmp_path):
    out, _ = pushed
    one_line(invoke("push", str(out), "a/b/c", "--endpoint", hub.url), 2, "'a/b/c' is not a hub repo id")
    one_line(invoke("push", str(out), "me/x", env={"HF_TOKEN": "", "HF_ENDPOINT": hub.url}), 2, "no Hugging Face token")
    unreachable = "http://127.0.0.1:9"  # the discard port: nothing listens
    one_line(
        invoke("push", str(out), "me/x", "--endpoint", unreachable), 2, f"cannot check the token with {unreachable}"
    )
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "metrics.json").write_text("{}\n")
    one_line(invoke("push", str(copy), "me/changed", "--endpoint", hub.url), 2, "does not match its manifest.json")
    one_line(invoke("push", str(tmp_path), "me/none", "--endpoint", hub.url), 2, "has no manifest.json")
    assert "me/changed" not in hub.repos and "me/none" not in hub.repos and "me/x" not in hub.repos
    one_line(invoke("run", "m", "--out", str(tmp_path / "o"), "--public"), 2, "add --push-to-hub REPO_ID")


def test_hub_files_of_a_downloaded_copy_are_not_the_folders(pushed, tmp_path):
    """A copy made by ``hf download --local-dir`` has .gitattributes and .cache/huggingface/: verify ignores them."""
    out, _ = pushed
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (copy / ".cache" / "huggingface").mkdir(parents=True)
    (copy / ".cache" / "huggingface" / "README.md.metadata").write_text("x\n")
    assert invoke("verify", str(copy)).exit_code == 0
    assert ".gitattributes" not in read_manifest(copy)["outputs"]


def test_base_model_of(tmp_path, cached_model, monkeypatch):
    hub_id = base_model_of("Qwen/Qwen2.5-0.5B-Instruct")
    assert hub_id.hub_id == "Qwen/Qwen2.5-0.5B-Instruct" and not hub_id.why
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\n---\n")
    base = base_model_of(str(local))
    assert base.hub_id is None and "local folder my-model" in base.why
    assert base.license == {"license": "other", "license_name": "tiny-license"}
    assert base_model_of(str(cached_model)).hub_id == "tiny-org/tiny-qwen"
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path))
    demo = tmp_path / "qwen2.5-coder-0.5b-instruct"
    demo.mkdir()
    assert base_model_of(str(demo)).hub_id is None, "the card knows no demo: the run passes it in"
    base = base_model_of(str(demo), known_models())
    assert base.hub_id == "Qwen/Qwen2.5-Coder-0.5B-Instruct" and base.license == {"license": "apache-2.0"}


@pytest.mark.parametrize("adapter", [False, True])
def test_front_matter_parses(adapter, tmp_path):
    for base in (base_model_of("org/model: odd"), base_model_of(str(tmp_path))):
        (tmp_path / "README.md").write_text(front_matter(base, adapter=adapter) + "\n# body\n")
        data = ModelCard.load(tmp_path / "README.md").data.to_dict()
        assert "base_model" not in data and "base_model_relation" not in data
        assert data["library_name"] == ("peft" if adapter else "transformers")
    base = base_model_of("org/model")
    (tmp_path / "README.md").write_text(front_matter(base, adapter=adapter))
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert data["base_model"] == "org/model" and data["base_model_relation"] == ("adapter" if adapter else "finetune")
