"""edgepc's on-device core: Python 3.8+, numpy and the runtime, nothing else (no torch, no
edgepc training code). The pipeline's validate stage runs this same code on the host.

- :mod:`.bundle`: a bundle's manifest, its verification (sizes and sha256), the test set and its
  normalisation;
- :mod:`.runtimes`: onnxruntime and LiteRT behind one call, ``images -> (logits, embedding)``;
- :mod:`.metrics`: top-1 and the ``pc_*`` coherence metrics, in numpy;
- :mod:`.timing`: the batch-1 latency timer and its summary;
- :mod:`.report`: the device report (one schema, written here and read by the host);
- :mod:`.cpu`, :mod:`.mobile`, :mod:`.jetson`, :mod:`.build_engine`: the commands.

Copy this folder and a bundle to the device, then ``python3 -m edgepc_device.cpu BUNDLE``
(see README.md beside this file).
"""
