# CUDA settings.
#
# nixpkgs reads `cudaSupport`, `cudaCapabilities` and the unfree switches from the `config`
# argument it is imported with, which an overlay cannot change. So this file exports:
#
#   presets        the compute-capability presets users choose from
#   nixpkgsConfig  { cudaSupport ? true, preset ? "default", wheels ? false } -> the `config` for
#                  `import nixpkgs`; wheels = true: the config for ./cuda-wheels.nix (see there)
#   overlay        final: prev: that refuses a CUDA release too old for the chosen GPUs, and adds
#                  llm-finetune-cuda (what the shells' help says about CUDA; null without CUDA)
#
# Which CUDA, and why. At the pinned nixpkgs (pkgs/top-level/all-packages.nix):
#   cudaPackages = recurseIntoAttrs cudaPackages_12;  cudaPackages_12 = cudaPackages_12_9;
#   cudaPackages_13 = cudaPackages_13_2;
# so the default set is CUDA 12.9. DGX Spark's GB10 is compute capability 12.1, and
# pkgs/development/cuda-modules/_cuda/data/cuda.nix gives "12.1" (and "12.1a", "12.1f")
# `minCudaMajorMinorVersion = "12.9"`: 12.9 is the first release that can target it. H100 ("9.0")
# needs 11.8. We stay on the default 12.9 because that is what the CUDA binary cache builds torch
# against; CUDA 13 would mean building the whole stack from source.
#
# Presets (see playbooks/pytorch-fine-tune/README.md for the trade-off):
#   default  config.cudaCapabilities unset: nixpkgs' default list, every non-Jetson baseline
#            capability CUDA 12.9 supports (Turing 7.5 up to Blackwell 12.x, 9.0 included).
#            This is what https://cache.nixos-cuda.org builds (x86_64-linux only), so it
#            gives cache hits there; aarch64-linux has no CUDA cache.
#            (sm_120 code also runs on 12.1: same major, binary compatible.)
#   spark    [ "12.1" ]  DGX Spark / GB10 only. Smaller, but torch builds from source (hours).
#   h100     [ "9.0" ]   H100 / H200 / GH200 only. Same trade-off.
let
  presets = {
    default = null;
    spark = [ "12.1" ];
    h100 = [ "9.0" ];
  };

  # The oldest CUDA that supports every capability we offer (12.1 needs 12.9).
  minimumCuda = "12.9";
in
{
  inherit presets minimumCuda;

  nixpkgsConfig =
    {
      cudaSupport ? true,
      preset ? "default",
      wheels ? false,
    }:
    let
      known = toString (builtins.attrNames presets);
      capabilities =
        if presets ? ${preset} then
          presets.${preset}
        else
          throw "unknown CUDA preset '${preset}'; choose one of: ${known}";
      fromNixpkgs = {
        inherit cudaSupport;
      }
      // (
        if cudaSupport then
          {
            # CUDA, cuDNN, NCCL, cuSPARSELt ... are unfree (NVIDIA's licenses). Allowing unfree
            # packages does not change any derivation, so the binary cache still matches.
            allowUnfree = true;
          }
          // (if capabilities == null then { } else { cudaCapabilities = capabilities; })
        else
          { }
      );
      # CUDA comes from PyPI's wheels (./cuda-wheels.nix), so nixpkgs builds nothing for CUDA:
      # every other package is its cached CPU build. The NVIDIA wheels are unfree.
      fromWheels = {
        cudaSupport = false;
        allowUnfree = true;
      };
    in
    if wheels then fromWheels else fromNixpkgs;

  overlay =
    final: prev:
    let
      enabled = final.config.cudaSupport or false;
      version = prev.cudaPackages.cudaMajorMinorVersion;
    in
    {
      # Passes nixpkgs' default CUDA set through unchanged, but refuses to evaluate with one older
      # than 12.9 (e.g. after a flake.lock update that moved the default back).
      cudaPackages =
        if enabled && builtins.compareVersions version minimumCuda < 0 then
          throw "this flake needs CUDA >= ${minimumCuda} (compute capability 12.1, DGX Spark); nixpkgs' cudaPackages is ${version}"
        else
          prev.cudaPackages;

      # CUDA 12 runs on drivers >= 525 through CUDA's minor-version compatibility; NVIDIA's CUDA
      # 12.9 release notes give >= 575 for everything in 12.9.
      llm-finetune-cuda =
        if enabled then
          {
            description = "CUDA ${version}, built by nixpkgs";
            cudaVersion = version;
            minimumDriver = "525";
            driver = ">= 525 (CUDA ${version} through minor-version compatibility; 575 or newer for all of it)";
          }
        else
          null;
    };
}
