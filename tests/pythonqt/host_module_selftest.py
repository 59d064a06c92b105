"""Inside the PythonQt host: the module's own self-test (MediRoundTest, what Slicer's "Reload and Test" and
`slicer_add_python_unittest` run), through unittest as slicer.testing runs it. With MEDIROUND_BLOCK=torch it is
the test of a Slicer build tree, where torch is not installed. Prints PQRESULT {json}."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # noqa: E401,E702
import slicer_shim  # noqa: E402

slicer = slicer_shim.install()

import json  # noqa: E402
import unittest  # noqa: E402

import MediRound  # noqa: E402

result = unittest.TextTestRunner(verbosity=2).run(unittest.defaultTestLoader.loadTestsFromTestCase(MediRound.MediRoundTest))
print("PQRESULT " + json.dumps({"run": result.testsRun, "failures": [t[1] for t in result.failures + result.errors],
                                "engine": MediRound.MediRoundTest.engine_factory()[0],
                                "torch_imported": "torch" in sys.modules}))
