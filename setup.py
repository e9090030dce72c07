"""setuptools, for what pyproject.toml cannot say: conf/ (the systemd unit, the logrotate
file, the default and sample configs, the man pages) goes into the wheel as package data,
poolmgr/conf/, beside the code that generates most of it. MANIFEST.in puts it in the sdist."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    def run(self):
        super().run()
        self.mkpath(os.path.join(self.build_lib, "poolmgr", "conf"))
        for name in sorted(os.listdir("conf")):
            self.copy_file(os.path.join("conf", name),
                           os.path.join(self.build_lib, "poolmgr", "conf", name))


setup(cmdclass={"build_py": BuildPyWithConf})
