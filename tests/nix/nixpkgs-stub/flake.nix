# A small stand-in for nixpkgs, so that this repository's flake can be evaluated (not built) with
# an old Nix and no network:
#
#   nix flake check --no-build --offline --no-write-lock-file \
#     --override-input nixpkgs path:tests/nix/nixpkgs-stub
#
# It provides only what flake.nix, overlays/ and playbooks/ use, with the nixpkgs versions of the
# pinned revision. Derivations are real `derivation`s with a builder that always fails, carrying
# their inputs as attributes for tests to inspect. python3.withPackages only knows the packages
# listed in ./python.nix, so a misspelt package name fails evaluation, and buildPythonPackage
# checks declared version bounds the way nixpkgs' runtime-dependency check does at build time.
{
  description = "nixpkgs stand-in for evaluating this flake offline";

  outputs =
    { self }:
    {
      lib = import ./lib.nix;
      legacyPackages = self.lib.genAttrs [
        "x86_64-linux"
        "aarch64-linux"
      ] (system: import ./. { inherit system; });
    };
}
