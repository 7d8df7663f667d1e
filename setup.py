"""Ships ``circuit_peft_autoload.pth`` into site-packages (see circuit_peft_autoload.py); the rest is pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "circuit_peft_autoload.pth"


class BuildWithAutoload(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / PTH
        target.parent.mkdir(parents=True, exist_ok=True)
        self.copy_file(PTH, str(target), preserve_mode=0)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]

    def get_output_mapping(self):
        mapping = dict(super().get_output_mapping())
        mapping[str(Path(self.build_lib) / PTH)] = PTH
        return mapping


setup(cmdclass={"build_py": BuildWithAutoload})
