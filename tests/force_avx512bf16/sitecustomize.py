"""On PYTHONPATH, makes bitsandbytes believe the CPU has AVX512-BF16 (bitsandbytes.functional.has_avx512bf16 returns
True), so a test exercises the import path that only such CPUs take, whatever CPU it runs on."""

import importlib.machinery
import sys


class ForceAvx512Bf16:
    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module

        def exec_and_force(module):
            exec_module(module)
            module.has_avx512bf16 = lambda: True

        spec.loader.exec_module = exec_and_force
        return spec


sys.meta_path.insert(0, ForceAvx512Bf16())
