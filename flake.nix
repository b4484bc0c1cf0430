{
  description = "Fused Triton kernels for the Qwen3 MoE block";

  inputs = {
    kernel-builder.url = "github:huggingface/kernels";
  };

  outputs =
    {
      self,
      kernel-builder,
    }:
    kernel-builder.lib.genKernelFlakeOutputs {
      inherit self;
      path = ./.;
      # The `ci-test` output runs `pytest -m kernels_ci tests` with torch,
      # pytest and kernels only; list here any other package those tests need,
      # e.g. `pythonCheckInputs = ps: with ps; [ transformers ];`.
    };
}
