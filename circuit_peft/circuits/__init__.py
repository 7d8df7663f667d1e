"""Views of a :class:`~circuit_peft.circuit.Circuit`: which components it keeps (``selection``), its file
format and model checks, its pictures."""
