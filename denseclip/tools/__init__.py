"""The tools the command line wraps: speed and memory benchmarks (:mod:`.bench`), parameter
and multiply-add counts (:mod:`.flops`), ONNX export (:mod:`.export`) and the local demo
page (:mod:`.demo`). They sit above the tasks, the predictor and the engine, and nothing in
the package below them imports them."""
