"""glmjax serving: the engine interface, the continuous-batching orchestrator and the gRPC
server (`glmjax-serve`) and client (`glmjax-client`)."""
