"""Tool calling: the model's tool-call formats (``--tool-call-parser``), the grammars that
enforce a call, and the incremental parser that turns output text into ``tool_calls``."""

from router.tools.formats import FORMATS, ToolFormat, get_format

__all__ = ["FORMATS", "ToolFormat", "get_format"]
