# python314 and its package set for the stand-in. Only the packages listed in `known` exist, at the
# versions of the pinned nixpkgs revision, so `ps.<typo>` fails evaluation. `requires` are the
# version bounds each package declares (what nixpkgs' pythonRuntimeDepsCheckHook enforces at build
# time); buildPythonPackage checks them against the chosen dependencies unless relaxed with
# pythonRelaxDeps.
{
  lib,
  mkFake,
  final,
  config,
  cudaPackages,
  # What `python3.override { packageOverrides = ...; }` passes: applied after pythonPackagesExtensions.
  packageOverrides ? (_: _: { }),
}@args:
let
  pythonVersion = "3.14";
  sitePackages = "lib/python${pythonVersion}/site-packages";

  # name = [ version dependencies requires extra ]
  known = {
    setuptools = [ "80.9.0" [ ] { } ];
    wheel = [ "0.46.1" [ ] { } ];
    numpy = [ "2.3.4" [ ] { } ];
    packaging = [ "25.0" [ ] { } ];
    filelock = [ "3.20.0" [ ] { } ];
    fsspec = [ "2025.10.0" [ ] { } ];
    click = [ "8.3.1" [ ] { } ];
    httpx = [ "0.28.1" [ ] { } ];
    hf-xet = [ "1.2.0" [ ] { } ];
    tqdm = [ "4.67.1" [ ] { } ];
    typing-extensions = [ "4.15.0" [ ] { } ];
    typer = [ "0.20.0" [ ] { } ];
    regex = [ "2025.11.3" [ ] { } ];
    scipy = [ "1.16.3" [ ] { } ];
    pandas = [ "2.3.3" [ ] { } ];
    pyarrow = [ "22.0.0" [ ] { } ];
    dill = [ "0.4.0" [ ] { } ];
    multiprocess = [ "0.70.18" [ ] { } ];
    xxhash = [ "3.6.0" [ ] { } ];
    rich = [ "14.2.0" [ ] { } ];
    psutil = [ "7.1.3" [ ] { } ];
    protobuf = [ "6.33.1" [ ] { } ];
    pyyaml = [ "6.0.3" [ ] { } ];
    safetensors = [ "0.8.0" [ ] { } ];
    tensorboard = [ "2.21.0" [ ] { } ];
    pytest = [ "9.0.1" [ ] { } ];
    ruff = [ "0.14.0" [ ] { } ];
    requests = [ "2.32.5" [ ] { } ];
    pillow = [ "12.0.0" [ ] { } ];
    # For playbooks/llama-factory: present in nixpkgs; versions not read from its source (only
    # their presence is checked here).
    hatchling = [ "1.27.0" [ ] { } ];
    torchvision = [ "0.28.0" [ ] { } ];
    torchaudio = [ "2.13.0" [ ] { } ];
    torchdata = [ "0.11.0" [ ] { } ];
    urllib3 = [ "2.5.0" [ ] { } ];
    einops = [ "0.8.1" [ ] { } ];
    sentencepiece = [ "0.2.1" [ ] { } ];
    tiktoken = [ "0.12.0" [ ] { } ];
    modelscope = [ "1.31.0" [ ] { } ];
    hf-transfer = [ "0.1.9" [ ] { } ];
    av = [ "16.0.1" [ ] { } ];
    fire = [ "0.7.1" [ ] { } ];
    omegaconf = [ "2.3.0" [ ] { } ];
    pydantic = [ "2.12.4" [ ] { } ];
    uvicorn = [ "0.38.0" [ ] { } ];
    fastapi = [ "0.121.1" [ ] { } ];
    starlette = [ "0.49.3" [ ] { } ];
    sse-starlette = [ "3.0.3" [ ] { } ];
    gradio = [ "5.49.1" [ ] { } ];
    gradio-client = [ "1.13.3" [ ] { } ];
    tyro = [ "1.0.5" [ ] { } ];
    docstring-parser = [ "0.17.0" [ ] { } ];
    shtab = [ "1.7.2" [ ] { } ];
    typeguard = [ "4.4.4" [ ] { } ];
    aiofiles = [ "25.1.0" [ ] { } ];
    aiohttp = [ "3.13.2" [ ] { } ];
    anyio = [ "4.11.0" [ ] { } ];
    audioop-lts = [ "0.2.2" [ ] { } ];
    brotli = [ "1.2.0" [ ] { } ];
    ffmpy = [ "0.6.4" [ ] { } ];
    groovy = [ "0.1.2" [ ] { } ];
    jinja2 = [ "3.1.6" [ ] { } ];
    markupsafe = [ "3.0.3" [ ] { } ];
    orjson = [ "3.11.4" [ ] { } ];
    pydub = [ "0.25.1" [ ] { } ];
    python-multipart = [ "0.0.20" [ ] { } ];
    safehttpx = [ "0.1.7" [ ] { } ];
    semantic-version = [ "2.10.0" [ ] { } ];
    tomlkit = [ "0.13.3" [ ] { } ];
    websockets = [ "15.0.1" [ ] { } ];
    # nixpkgs builds gguf from llama.cpp's gguf-py and versions it with llama.cpp's build number.
    gguf = [
      "9967"
      [
        "numpy"
        "pyyaml"
        "requests"
        "tqdm"
      ]
      { }
    ];
    matplotlib = [
      "3.10.5"
      [
        "numpy"
        "packaging"
        "pillow"
      ]
      { }
    ];
    huggingface-hub = [
      "1.28.0"
      [
        "click"
        "filelock"
        "fsspec"
        "hf-xet"
        "httpx"
        "packaging"
        "pyyaml"
        "tqdm"
        "typing-extensions"
      ]
      { }
      { pythonRelaxDeps = [ "click" ]; }
    ];
    tokenizers = [
      "0.23.2"
      [ "huggingface-hub" ]
      { huggingface-hub = [ "0.16.4" "2.0" ]; }
    ];
    torch = [
      "2.13.0"
      [
        "filelock"
        "fsspec"
        "numpy"
        "packaging"
        "typing-extensions"
      ]
      { }
      {
        inherit (config) cudaSupport;
        cudaCapabilities = if config.cudaSupport then cudaPackages.flags.cudaCapabilities else [ ];
        cudaToolkit = if config.cudaSupport then [ cudaPackages.cuda_nvcc ] else [ ];
        passthru = {
          inherit (config) cudaSupport;
          inherit cudaPackages;
        };
      }
    ];
    transformers = [
      "5.5.4"
      [
        "huggingface-hub"
        "numpy"
        "packaging"
        "pyyaml"
        "regex"
        "safetensors"
        "tokenizers"
        "tqdm"
        "typer"
      ]
      {
        huggingface-hub = [ "1.5.0" "2.0" ];
        tokenizers = [ "0.22.0" "0.23.0" ];
      }
    ];
    datasets = [
      "5.1.0"
      [
        "dill"
        "filelock"
        "fsspec"
        "huggingface-hub"
        "multiprocess"
        "numpy"
        "pandas"
        "pyarrow"
        "pyyaml"
        "tqdm"
        "xxhash"
      ]
      { huggingface-hub = [ "1.31.0" "2.0" ]; }
    ];
    accelerate = [
      "1.12.0"
      [
        "huggingface-hub"
        "numpy"
        "packaging"
        "psutil"
        "pyyaml"
        "safetensors"
        "torch"
      ]
      { }
    ];
    peft = [
      "0.18.0"
      [
        "accelerate"
        "huggingface-hub"
        "numpy"
        "packaging"
        "psutil"
        "pyyaml"
        "safetensors"
        "torch"
        "tqdm"
        "transformers"
      ]
      { }
    ];
    trl = [
      "0.25.1"
      [
        "accelerate"
        "datasets"
        "rich"
        "transformers"
      ]
      { transformers = [ "4.56.1" "99" ]; }
    ];
    bitsandbytes = [
      "0.48.2"
      [
        "scipy"
        "torch"
      ]
      { }
      {
        inherit (config) cudaSupport;
        cmakeFlags = [
          "-DCOMPUTE_BACKEND:STRING=${if config.cudaSupport then "cuda" else "cpu"}"
        ];
        passthru = {
          inherit (config) cudaSupport;
          inherit cudaPackages;
        };
      }
    ];
  };

  # Fails unless each declared bound holds for the dependency actually chosen.
  checkRequires =
    pname: requires: relaxed: dependencies:
    let
      byName = builtins.listToAttrs (map (d: lib.nameValuePair d.pname d) dependencies);
      problems = builtins.concatMap (
        dep:
        let
          bounds = requires.${dep};
          chosen = byName.${dep}.version or null;
        in
        if chosen == null || builtins.elem dep relaxed then
          [ ]
        else if lib.versionOlder chosen (builtins.elemAt bounds 0) then
          [ "${dep} ${chosen} is older than the required ${builtins.elemAt bounds 0}" ]
        else if lib.versionOlder (builtins.elemAt bounds 1) chosen then
          [ "${dep} ${chosen} is newer than the allowed ${builtins.elemAt bounds 1}" ]
        else
          [ ]
      ) (builtins.attrNames requires);
    in
    if problems == [ ] then
      true
    else
      throw "python3.pkgs.${pname}: runtime dependency check failed: ${builtins.concatStringsSep "; " problems}";

  buildPythonPackage =
    argsOrFn:
    let
      resolve = a: if builtins.isFunction a then lib.fix a else a;
      args = resolve argsOrFn;
      dependencies = args.dependencies or [ ];
      build-system = args.build-system or [ ];
      requires = args.requires or { };
      relaxed = args.pythonRelaxDeps or [ ];
    in
    mkFake {
      name = "python${pythonVersion}-${args.pname}-${args.version}";
      # The checks are derivation attributes, so they run when the package is instantiated (as
      # nixpkgs' run at build time), not when it is merely overridden.
      env = builtins.removeAttrs args [
        "passthru"
        "meta"
        "requires"
        "optional-dependencies"
      ];
      checks = {
        inputsAreDerivations =
          builtins.all lib.isDerivation (dependencies ++ build-system)
          || throw "buildPythonPackage ${args.pname}: dependencies and build-system must be derivations";
        runtimeDepsCheck = checkRequires args.pname requires relaxed dependencies;
      };
      meta = args.meta or { };
      passthru = (args.passthru or { }) // {
        inherit requires;
        overridePythonAttrs =
          f:
          buildPythonPackage (
            if builtins.isFunction argsOrFn then
              (
                finalAttrs:
                let
                  old = argsOrFn finalAttrs;
                in
                old // (if builtins.isFunction f then f old else f)
              )
            else
              argsOrFn // (if builtins.isFunction f then f argsOrFn else f)
          );
      };
    };

  basePackages =
    pyfinal:
    builtins.mapAttrs (
      pname: spec:
      let
        extra = if builtins.length spec > 3 then builtins.elemAt spec 3 else { };
      in
      buildPythonPackage (
        {
          inherit pname;
          version = builtins.elemAt spec 0;
          pyproject = true;
          src = pyfinal.fetchPypi {
            inherit pname;
            version = builtins.elemAt spec 0;
            hash = "";
          };
          dependencies = map (d: pyfinal.${d}) (builtins.elemAt spec 1);
          requires = builtins.elemAt spec 2;
          meta = { };
        }
        // extra
      )
    ) known
    // {
      inherit python buildPythonPackage;
      fetchPypi =
        {
          pname,
          version,
          hash,
          ...
        }:
        mkFake {
          name = "${pname}-${version}.tar.gz";
          env = {
            inherit pname version;
            pypiHash = hash;
          };
        };
      callPackage =
        fn: args:
        let
          f = if builtins.isFunction fn then fn else import fn;
        in
        f (builtins.intersectAttrs (builtins.functionArgs f) (final // pyfinal) // args);
    };

  pkgs = lib.fix (
    builtins.foldl' (f: ext: lib.extends ext f) basePackages (
      final.pythonPackagesExtensions ++ [ packageOverrides ]
    )
  );

  python = mkFake {
    name = "python3-${pythonVersion}.0";
    env = {
      version = "${pythonVersion}.0";
    };
    passthru = {
      inherit pythonVersion sitePackages pkgs;
      interpreter = "${python}/bin/python3";
      override =
        {
          packageOverrides ? (_: _: { }),
          ...
        }:
        import ./python.nix (args // { inherit packageOverrides; });
      withPackages =
        f:
        let
          selected = f pkgs;
        in
        assert
          builtins.isList selected || throw "python3.withPackages: the function must return a list";
        assert
          builtins.all lib.isDerivation selected
          || throw "python3.withPackages: every element must be a package";
        mkFake {
          name = "python3-${pythonVersion}.0-env";
          env = {
            packages = selected;
            packageNames = map (p: p.pname) selected;
          };
          passthru = {
            inherit python pkgs;
          };
        };
    };
  };
in
python
