"""GET /v1/loras without Ray (docs/api.md): the LoRA root's files as a request names them, and nothing else.

The real routes and IngressService over fake clients (tests/support/fake_service.py), each test on a LoRA
root of its own. The listing is `serve_app/loras/listing.py`; the policy that decides is `loras/sources.py`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.testclient import TestClient

from serve_app import errors
from serve_app.loras.listing import MAX_LISTED, list_root
from serve_app.web import service as service_module
from tests.support.fake_service import args_with, fake_app

KEY = "test-key-0123456789"


def write(root: Path, rel: str, size: int = 8) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def listing(root: Path, headers: dict | None = None, **overrides) -> dict:
    with TestClient(fake_app(args_with(root, **overrides)).api) as client:
        answer = client.get("/v1/loras", headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()


def paths(answer: dict) -> list[str]:
    return [entry["path"] for entry in answer["loras"]]


def test_the_root_files_are_listed_sorted_by_the_path_a_request_sends_with_their_sizes(tmp_path):
    for rel, size in (("peft.safetensors", 30), ("aitk/style.safetensors", 10), ("kohya.safetensors", 40),
                      ("aitk/other.safetensors", 20), ("upper/Big.SafeTensors", 5)):
        write(tmp_path, rel, size)
    write(tmp_path, "notes.txt")
    write(tmp_path, "aitk/config.yaml")
    (tmp_path / "empty-folder").mkdir()
    assert listing(tmp_path) == {"truncated": False, "loras": [
        {"path": "aitk/other.safetensors", "size_bytes": 20},
        {"path": "aitk/style.safetensors", "size_bytes": 10},
        {"path": "kohya.safetensors", "size_bytes": 40},
        {"path": "peft.safetensors", "size_bytes": 30},
        {"path": "upper/Big.SafeTensors", "size_bytes": 5},  # the policy takes the suffix in any case
    ]}


def test_nested_folders_are_listed_with_posix_names_the_policy_accepts(tmp_path):
    write(tmp_path, "a/b/c/deep.safetensors")
    write(tmp_path, "a/top.safetensors")
    write(tmp_path, "a-b/side.safetensors")
    write(tmp_path, "odd\\name.safetensors")  # a backslash: the policy refuses the name, so it is not offered
    write(tmp_path, "hf:owner/repo.safetensors")  # read as an hf:// source, not as this file: not offered
    app = fake_app(args_with(tmp_path))
    with TestClient(app.api) as client:
        answer = client.get("/v1/loras").json()
        assert paths(answer) == ["a-b/side.safetensors", "a/b/c/deep.safetensors", "a/top.safetensors"]
        # Each name, sent back as it is, is the file: the request is accepted.
        request = {"model": "flux", "prompts": [{"prompt": "x", "width": 64, "height": 64, "sample_steps": 1}],
                   "loras": [{"path": name} for name in paths(answer)[:1]]}
        assert client.post("/v1/generate", json=request).status_code == 200


def test_a_root_with_more_files_than_the_cap_lists_the_first_by_name_and_says_so(tmp_path):
    names = [f"lora-{i:05d}.safetensors" for i in range(MAX_LISTED + 3)]
    for name in reversed(names):
        (tmp_path / name).touch()
    answer = listing(tmp_path)
    assert answer["truncated"] is True
    assert paths(answer) == names[:MAX_LISTED]
    # Exactly the cap is not truncated.
    for name in names[MAX_LISTED:]:
        (tmp_path / name).unlink()
    answer = listing(tmp_path)
    assert answer["truncated"] is False and len(answer["loras"]) == MAX_LISTED


def test_symlinks_that_lead_out_of_the_root_are_never_listed_or_followed(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write(root, "peft.safetensors", 30)
    write(outside, "secret.safetensors")
    write(outside, "folder/inner.safetensors")
    (root / "escape.safetensors").symlink_to(outside / "secret.safetensors")
    (root / "escape-folder").symlink_to(outside / "folder", target_is_directory=True)
    (root / "broken.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    (root / "alias.safetensors").symlink_to(root / "peft.safetensors")  # inside the root: the policy accepts it
    write(root, "sub/real.safetensors")
    (root / "loop").symlink_to(root, target_is_directory=True)  # a folder behind a symlink is never entered
    answer = listing(root)
    assert answer["loras"] == [{"path": "alias.safetensors", "size_bytes": 30},  # its target's size
                               {"path": "peft.safetensors", "size_bytes": 30},
                               {"path": "sub/real.safetensors", "size_bytes": 8}]
    assert str(tmp_path) not in str(answer)  # no absolute path, ever


def test_hidden_files_and_folders_and_the_download_cache_are_skipped(tmp_path):
    write(tmp_path, "visible.safetensors")
    write(tmp_path, ".url-cache/0123abcd.safetensors")  # args_with's cache_dir: a URL download cache
    write(tmp_path, ".hidden.safetensors")
    write(tmp_path, "aitk/.trash/old.safetensors")
    assert paths(listing(tmp_path)) == ["visible.safetensors"]
    # A download cache under the root that is not hidden is skipped all the same.
    write(tmp_path, "downloads/4567ef.safetensors")
    assert paths(listing(tmp_path, loras={"cache_dir": str(tmp_path / "downloads")})) == ["visible.safetensors"]


def test_a_missing_root_lists_nothing(tmp_path):
    assert listing(tmp_path / "not-there") == {"loras": [], "truncated": False}


def test_the_walk_runs_off_the_event_loop(tmp_path, monkeypatch):
    write(tmp_path, "style.safetensors")
    where = []

    def watched(sources):
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append("worker thread")
        return list_root(sources)

    monkeypatch.setattr(service_module, "list_root", watched)
    assert paths(listing(tmp_path)) == ["style.safetensors"]
    assert where == ["worker thread"]


def test_with_a_key_the_list_needs_it(tmp_path):
    write(tmp_path / "root", "style.safetensors")
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    with TestClient(fake_app(args_with(tmp_path / "root", auth={"api_key_file": str(key_file)})).api) as client:
        refused = client.get("/v1/loras")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == errors.UNAUTHORIZED
        assert client.get("/v1/loras", headers={"X-API-Key": "wrong"}).status_code == 401
        answer = client.get("/v1/loras", headers={"Authorization": f"Bearer {KEY}"})
        assert answer.status_code == 200 and paths(answer.json()) == ["style.safetensors"]


def test_the_route_and_its_schema_are_in_openapi(tmp_path):
    with TestClient(fake_app(args_with(tmp_path)).api) as client:
        spec = client.get("/openapi.json").json()
    ok = spec["paths"]["/v1/loras"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/LoraList"}
    schemas = spec["components"]["schemas"]
    assert set(schemas["LoraList"]["properties"]) == {"loras", "truncated"}
    assert set(schemas["LoraFileInfo"]["properties"]) == {"path", "size_bytes"}
