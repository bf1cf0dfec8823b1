"""Builds h5watch's optional C parts; without a compiler, pure Python is used.

Set H5WATCH_NO_EXTENSIONS=1 to skip them on purpose.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler: the pure-Python fallback works
            print(f"h5watch: C extensions not built ({exc}); using the pure-Python fallback")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"h5watch: {ext.name} not built ({exc}); using the pure-Python fallback")


extensions = []
if os.environ.get("H5WATCH_NO_EXTENSIONS", "") not in ("1", "true", "yes"):
    extensions.append(Extension("h5watch.process._lockcore", ["h5watch/process/_lockcore.c"], optional=True))

setup(ext_modules=extensions, cmdclass={"build_ext": OptionalBuildExt})
