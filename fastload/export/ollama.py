"""An Ollama `Modelfile` next to a GGUF: `ollama create NAME -f Modelfile` then serves the fine-tuned model.

Ollama templates are Go templates, not Jinja: the two chat formats most fine-tunes use (ChatML, Llama-3) are
written as their Go equivalents; any other template falls back to a plain prompt, with a note saying so.
"""

from __future__ import annotations

from pathlib import Path

from fastload._log import logger

CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""
PLAIN = "{{ .Prompt }}"
TEMPLATES = (("<|im_start|>", CHATML, ("<|im_start|>", "<|im_end|>")),
             ("<|start_header_id|>", LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")))


def modelfile_text(gguf_file: str, chat_template: str | None, eos_token: str | None) -> str:
    """The Modelfile for a GGUF whose tokenizer has this chat template and end-of-sequence token."""
    template, stops, note = PLAIN, [], ""
    for marker, go_template, markers in TEMPLATES:
        if chat_template and marker in chat_template:
            template, stops = go_template, list(markers)
            break
    else:
        note = ("# The chat template could not be translated to Ollama's Go template syntax: a plain prompt is used.\n"
                "# Edit TEMPLATE to match the chat format the model was trained on.\n")
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines = [f"# Ollama Modelfile written by fastload: ollama create NAME -f {Path('Modelfile')}", note.rstrip(),
             f"FROM ./{gguf_file}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(line for line in lines if line) + "\n"


def write_modelfile(gguf_path: Path) -> Path:
    """Write `Modelfile` beside the GGUF, from the chat template and eos token stored in the GGUF itself."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    template = _field(reader, "tokenizer.chat_template")
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    eos = tokens.contents(int(eos_id)) if tokens is not None and eos_id is not None else None
    out = gguf_path.parent / "Modelfile"
    tmp = out.with_name(".Modelfile.tmp")
    tmp.write_text(modelfile_text(gguf_path.name, template, eos))
    tmp.replace(out)
    logger.info("wrote the Ollama Modelfile %s (ollama create NAME -f %s)", out, out)
    return out


def _field(reader, key: str):
    field = reader.fields.get(key)
    return field.contents() if field is not None else None
