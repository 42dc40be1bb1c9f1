# The `config` module of the stand-in: the options of nixpkgs' pkgs/top-level/config.nix that this
# flake and the stand-in read, with nixpkgs' types and defaults, evaluated with the real
# lib.evalModules like nixpkgs does. So `config.cudaCapabilities` is `[ ]` unless set (never
# absent, never null), and a wrongly typed value fails as it would with nixpkgs. Anything else is
# accepted as free-form, like nixpkgs' `freeformType`.
{ lib, ... }:
let
  inherit (lib) mkOption types;
  flag =
    default:
    mkOption {
      type = types.bool;
      inherit default;
    };
in
{
  freeformType = types.lazyAttrsOf types.raw;

  options = {
    allowBroken = flag false;
    allowUnfree = flag false;
    allowUnsupportedSystem = flag false;
    checkMeta = flag false;
    cudaSupport = flag false;
    rocmSupport = flag false;
    # nixpkgs: "If not provided, the default value is calculated per-package set, derived from a
    # list of GPUs supported by that CUDA version."
    cudaCapabilities = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    cudaForwardCompat = flag true;
    doCheckByDefault = flag false;
  };
}
