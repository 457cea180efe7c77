"""Compatibility surfaces: code written for another library runs on fastload by changing only its imports.

`fastload.compat.unsloth` holds Unsloth's names (FastLanguageModel, is_bfloat16_supported, the save methods a
notebook calls on the model); `fastload.chat_templates` re-exports Unsloth's chat-template helpers. Nothing here is
imported by `import fastload`.
"""
