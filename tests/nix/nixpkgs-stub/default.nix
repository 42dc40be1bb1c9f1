# `import nixpkgs { system; overlays; config; }` for the stand-in: a fixed point of the base set
# below extended by the overlays, like nixpkgs' own.
{
  system ? builtins.currentSystem,
  overlays ? [ ],
  config ? { },
  ...
}:
let
  lib = import ./lib.nix;

  config' = {
    cudaSupport = false;
    allowUnfree = false;
  }
  // config;

  # A derivation that evaluates like a real one (drvPath, outPath) but never builds. `env` becomes
  # derivation attributes (strings, lists, derivations); `passthru` is added to the result only.
  mkFake =
    {
      name,
      env ? { },
      passthru ? { },
      outputs ? [ "out" ],
      meta ? { },
      # Attributes (bool/string valued) that are only evaluated when the derivation is
      # instantiated, for checks nixpkgs would only run at build time.
      checks ? { },
    }:
    let
      storable = lib.filterAttrs (
        _: v:
        builtins.isString v
        || builtins.isBool v
        || builtins.isInt v
        || builtins.isList v
        || builtins.isPath v
        || lib.isDerivation v
      ) env;
      drv = derivation (
        storable
        // checks
        // {
          inherit name system outputs;
          builder = "/bin/sh";
          args = [
            "-c"
            "echo 'this is the nixpkgs stand-in used for evaluation tests; it cannot build' >&2; exit 1"
          ];
        }
      );
    in
    drv // env // passthru // { inherit meta; };

  unfreeAllowed =
    pkg: config'.allowUnfree || (config' ? allowUnfreePredicate && config'.allowUnfreePredicate pkg);
  unfree =
    pkg:
    if unfreeAllowed pkg then
      pkg
    else
      throw "Package '${pkg.name}' has an unfree license, refusing to evaluate (the stand-in mirrors nixpkgs' config.allowUnfree check).";

  base =
    final:
    let
      cudaVersion = "12.9";
      # nixpkgs' default capabilities for CUDA 12.9 (every non-Jetson baseline capability).
      defaultCapabilities = [
        "7.5"
        "8.0"
        "8.6"
        "8.9"
        "9.0"
        "10.0"
        "10.3"
        "12.0"
        "12.1"
      ];
      capabilities = config'.cudaCapabilities or defaultCapabilities;
      minimumCuda = {
        "12.1" = "12.9";
        "12.0" = "12.8";
      };
      cudaPackages = {
        cudaMajorMinorVersion = cudaVersion;
        cudaMajorVersion = "12";
        cuda_nvcc = unfree (mkFake {
          name = "cuda_nvcc-12.9.86";
          outputs = [
            "out"
            "bin"
          ];
          meta.license = "unfree";
        });
        flags = {
          cudaCapabilities = map (
            c:
            if lib.versionOlder cudaVersion (minimumCuda.${c} or "0") then
              throw "CUDA ${cudaVersion} does not support compute capability ${c}"
            else
              c
          ) capabilities;
          cmakeCudaArchitecturesString = builtins.concatStringsSep ";" (
            map (builtins.replaceStrings [ "." ] [ "" ]) cudaPackages.flags.cudaCapabilities
          );
        };
      };
      tool =
        name: version: mainProgram:
        mkFake {
          name = "${name}-${version}";
          env = {
            pname = name;
            inherit version;
          };
          meta = { inherit mainProgram; };
        };
    in
    {
      inherit lib system;
      config = config';

      stdenv = {
        hostPlatform = {
          inherit system;
          isLinux = true;
          isx86_64 = system == "x86_64-linux";
          isAarch64 = system == "aarch64-linux";
        };
      };

      callPackage =
        fn: args:
        let
          f = if builtins.isFunction fn then fn else import fn;
        in
        f (builtins.intersectAttrs (builtins.functionArgs f) final // args);

      mkShell =
        {
          name ? "nix-shell",
          packages ? [ ],
          shellHook ? "",
          passthru ? { },
          ...
        }@attrs:
        assert
          builtins.all lib.isDerivation packages || throw "mkShell: packages must be derivations";
        mkFake {
          inherit name passthru;
          env = builtins.removeAttrs attrs [ "passthru" ] // {
            inherit shellHook;
          };
        };

      runCommand =
        name: env: buildCommand:
        assert builtins.isString buildCommand;
        mkFake {
          inherit name;
          env = builtins.removeAttrs env [ "passthru" ] // {
            inherit buildCommand;
          };
          passthru = env.passthru or { };
        };

      writeShellApplication =
        {
          name,
          text,
          runtimeInputs ? [ ],
          ...
        }:
        assert builtins.all lib.isDerivation runtimeInputs;
        mkFake {
          inherit name;
          env = {
            inherit text runtimeInputs;
          };
          meta.mainProgram = name;
        };

      fetchFromGitHub =
        {
          owner,
          repo,
          hash,
          tag ? null,
          rev ? null,
          ...
        }:
        assert
          (tag == null) != (rev == null) || throw "fetchFromGitHub: give exactly one of tag and rev";
        mkFake {
          name = "source";
          env = {
            inherit owner repo hash;
            rev = if tag != null then "refs/tags/${tag}" else rev;
          };
        };

      coreutils = tool "coreutils" "9.8" "coreutils";
      findutils = tool "findutils" "4.10.0" "find";
      ruff = tool "ruff" "0.14.0" "ruff";
      nixfmt = tool "nixfmt" "1.1.0" "nixfmt";
      nixfmt-tree = tool "nixfmt-tree" "1.1.0" "treefmt";

      inherit cudaPackages;
      cudaPackages_12_9 = cudaPackages;

      pythonPackagesExtensions = [ ];
      python314 = import ./python.nix {
        inherit
          lib
          mkFake
          final
          cudaPackages
          ;
        config = config';
      };
      python3 = final.python314;
    };
in
lib.fix (builtins.foldl' (f: overlay: lib.extends overlay f) base overlays)
