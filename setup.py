"""One build step beyond pyproject.toml: install ``compose_lm_eval.pth`` beside the packages.

The .pth runs ``_compose_lm_eval.install()`` at interpreter start, so that lm-eval releases
without plugin discovery still resolve ``lm_eval --model compose`` (see _compose_lm_eval.py).
It is written for regular and for editable (``pip install -e .``) installs alike.
"""

from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build

PTH_NAME = "compose_lm_eval.pth"
PTH_LINE = "import _compose_lm_eval; _compose_lm_eval.install()\n"


class build_pth(Command):
    description = f"write {PTH_NAME}"
    user_options = []

    def initialize_options(self):
        self.build_lib = None
        self.editable_mode = False
        self._written = []

    def finalize_options(self):
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def run(self):
        # an editable wheel holds only what is written into its install directory, not build_lib
        where = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        path = Path(where) / PTH_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(PTH_LINE)
        self._written = [str(path)]

    def get_outputs(self):
        return self._written

    def get_output_mapping(self):
        return {}


class build_with_pth(build):
    sub_commands = [*build.sub_commands, ("build_pth", None)]


setup(cmdclass={"build": build_with_pth, "build_pth": build_pth})
