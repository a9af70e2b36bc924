"""The Open Inference Protocol over gRPC (KServe's ``grpc_predict_v2.proto``), served by
``inferd serve --grpc-port`` in the same process and event loop as HTTP; see docs/protocols.md.
"""
