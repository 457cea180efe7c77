"""push_to_hub against a local HTTP server that speaks the few endpoints huggingface_hub's upload uses (create repo,
preupload, commit): the files that arrive are the ones fastload built, with a model card, in one commit, and the
token travels in the Authorization header but never into a log line."""

from __future__ import annotations

import base64
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from fastload import FastModel
from fastload.errors import InvalidOption, SaveError
from tiny import nonzero_lora_b

TOKEN = "hf_fastloadTestToken0123456789"


class FakeHub(BaseHTTPRequestHandler):
    """Create repo, preupload (every file 'regular': sent inline in the commit), commit; records what it got."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        hub = self.server.hub
        hub["auth"].add(self.headers.get("Authorization"))
        hub["paths"].append(self.path)
        if self.path == "/api/repos/create":
            hub["created"] = json.loads(body)
            return self._json({"url": f"{hub['endpoint']}/{hub['created']['organization']}/{hub['created']['name']}"})
        if self.path == "/api/validate-yaml":  # the model card's YAML header
            hub["card_checked"] = True
            return self._json({})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in files]})
        if "/commit/" in self.path:
            hub["commits"] += 1
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    hub["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._json({"commitUrl": f"{hub['endpoint']}/me/tuned/commit/abc123", "commitOid": "abc123"})
        self.send_response(404)
        self.end_headers()

    def _json(self, data):
        payload = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once, at import
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    server.hub = {"endpoint": endpoint, "auth": set(), "paths": [], "files": {}, "commits": 0}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.hub
    server.shutdown()
    server.server_close()


@pytest.fixture
def tuned(tiny_llama):
    model, tok = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    nonzero_lora_b(model)
    return model, tok


def test_push_adapter_uploads_the_adapter_and_a_model_card_in_one_commit(hub, tuned, caplog):
    model, tok = tuned
    with caplog.at_level(logging.DEBUG):
        url = FastModel.push_to_hub(model, "me/tuned", tok, what="adapter", token=TOKEN, endpoint=hub["endpoint"],
                                    training={"examples": 120, "train_loss": 1.234})
    assert url.endswith("/commit/abc123") and hub["commits"] == 1
    assert hub["created"]["visibility"] == "private" and hub["created"]["name"] == "tuned"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json"} <= set(hub["files"])
    card = hub["files"]["README.md"].decode()
    assert "base_model:" in card and "rank r: 16" in card and "train loss: 1.234" in card and "fastload" in card
    assert f"Bearer {TOKEN}" in hub["auth"]
    assert TOKEN not in caplog.text


def test_push_gguf_uploads_the_gguf_and_modelfile(hub, tuned):
    model, tok = tuned
    FastModel.push_to_hub(model, "me/tuned", tok, what="gguf", token=TOKEN, endpoint=hub["endpoint"])
    assert {"model-q8_0.gguf", "Modelfile", "README.md"} <= set(hub["files"])
    assert hub["files"]["model-q8_0.gguf"][:4] == b"GGUF"


def test_push_refuses_bad_arguments_before_building_anything(tuned):
    model, tok = tuned
    with pytest.raises(InvalidOption, match="merged-4bit"):
        FastModel.push_to_hub(model, "me/tuned", tok, what="everything")
    with pytest.raises(InvalidOption, match="user/name"):
        FastModel.push_to_hub(model, "tuned", tok)


def test_a_refused_upload_is_a_save_error_without_the_token(hub, tuned):
    model, tok = tuned
    with pytest.raises(SaveError) as caught:  # the server has no such endpoint for this repo type
        FastModel.push_to_hub(model, "me/tuned", tok, token=TOKEN, endpoint=hub["endpoint"] + "/nowhere")
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize("command", [["export", "hub"], ["push"]])
def test_cli_pushes_an_adapter_with_the_logged_in_token(hub, tuned, tmp_path, monkeypatch, capsys, command):
    import huggingface_hub.constants

    from fastload.cli import main

    model, tok = tuned
    adapter = FastModel.save_adapter(model, tmp_path / "adapter", tokenizer=tok)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub["endpoint"])
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    capsys.readouterr()
    assert main([*command, str(adapter), "--repo", "me/tuned", "--json", "-q"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["commit"].endswith("/commit/abc123")
    assert "adapter_model.safetensors" in hub["files"] and f"Bearer {TOKEN}" in hub["auth"]
    assert TOKEN not in captured.out + captured.err
