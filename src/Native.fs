/// Device choice, seeding and libtorch start-up: the only module that knows which machine it runs on.
module Moe.Native

open System
open TorchSharp

/// Where tensors live: `Auto` takes CUDA when libtorch sees a GPU, otherwise the CPU.
type DeviceChoice =
    | Auto
    | Cpu
    | Cuda

/// Parses `auto|cpu|cuda` (any case) as given to `--device`.
let parseDevice (text: string) : Result<DeviceChoice, string> =
    match (if isNull text then "" else text.Trim().ToLowerInvariant()) with
    | "auto" -> Ok Auto
    | "cpu" -> Ok Cpu
    | "cuda" -> Ok Cuda
    | other -> Error(sprintf "expected device auto|cpu|cuda, got '%s'" other)

/// True when libtorch was built with CUDA and sees at least one GPU.
let cudaAvailable () : bool = torch.cuda.is_available ()

/// The torch device for a choice; asking for CUDA where there is none is an error, not a fallback.
let resolveDevice (choice: DeviceChoice) : torch.Device =
    match choice with
    | Cpu -> torch.CPU
    | Auto -> if cudaAvailable () then torch.CUDA else torch.CPU
    | Cuda ->
        if cudaAvailable () then torch.CUDA
        else invalidOp "device cuda was asked for, but libtorch sees no CUDA GPU (CPU build, or no driver); use --device cpu or auto"

/// Seeds libtorch's CPU and CUDA generators. With the same seed, thread count and build, CPU runs repeat exactly.
let seedAll (seed: int) : unit =
    torch.manual_seed (int64 seed) |> ignore
    if cudaAvailable () then torch.cuda.manual_seed_all (int64 seed)

/// A one-line description of the runtime: libtorch build, threads, devices.
let describeRuntime () : string =
    let cuda = if cudaAvailable () then sprintf "cuda x%d" (torch.cuda.device_count ()) else "no cuda"
    sprintf "TorchSharp %s, libtorch %s, %d threads, %s"
        (typeof<torch.Tensor>.Assembly.GetName().Version.ToString())
        (torch.__version__)
        (torch.get_num_threads ())
        cuda

/// Forces libtorch to load and run one operation; throws with the loader's message when it cannot.
let initialise () : unit =
    try
        use t = torch.ones (2L)
        use s = t.sum ()
        if s.item<float32> () <> 2.0f then invalidOp "libtorch computed 1 + 1 <> 2"
    with e ->
        let rec root (e: exn) = if isNull e.InnerException then e else root e.InnerException
        raise (InvalidOperationException(
            "libtorch failed to initialise: " + (root e).Message
            + " (on hosts whose libstdc++ lacks GLIBCXX_3.4.32 the build patches libLibTorchSharp.so; rebuild, or run scripts through scripts/prelude.fsx)", e))
