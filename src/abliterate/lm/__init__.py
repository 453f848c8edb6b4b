"""The loaded language model: loading (hub id, folder, GGUF), the LoadedModel wrapper, chat templates, saving, the
offline demo model. (Not `model/`: `abliterate.lm.model` is the old path of lm/model.py and keeps working.)
"""
