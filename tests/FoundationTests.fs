module Moe.Tests.FoundationTests

open System.IO
open Expecto
open TorchSharp
open Moe

let tests =
    testList "Foundation" [
        testCase "libtorch initialises and computes" <| fun () ->
            Native.initialise ()
            use a = torch.tensor ([| 1.0f; 2.0f; 3.0f |])
            Expect.floatClose Accuracy.high (Tensors.scalar (a.sum ())) 6.0 "1 + 2 + 3"

        testCase "the bin copy of libLibTorchSharp.so is patched where the host lacks GLIBCXX_3.4.32" <| fun () ->
            let shim = Path.Combine(System.AppContext.BaseDirectory, "runtimes", "linux-x64", "native", "libLibTorchSharp.so")
            if not (File.Exists shim) then skiptest "no linux-x64 libLibTorchSharp.so in this build"
            let offsets = GlibcxxPatch.vernauxFlagOffsets GlibcxxPatch.NeededVersion (File.ReadAllBytes shim)
            if GlibcxxPatch.hostHasVersion GlibcxxPatch.NeededVersion then
                Expect.isTrue true "host libstdc++ has the version; no patch needed"
            else
                let bytes = File.ReadAllBytes shim
                Expect.isNonEmpty offsets "the shim lists GLIBCXX_3.4.32"
                for o in offsets do
                    Expect.equal (int bytes[int o] &&& 2) 2 "VER_FLG_WEAK set on the GLIBCXX_3.4.32 need"

        testCase "device parsing names what it expected" <| fun () ->
            Expect.equal (Native.parseDevice "CPU") (Ok Native.Cpu) "case-insensitive"
            Expect.equal (Native.parseDevice "auto") (Ok Native.Auto) "auto"
            match Native.parseDevice "gpu" with
            | Error msg -> Expect.stringContains msg "auto|cpu|cuda" "lists the choices"
            | Ok _ -> failtest "gpu is not a device name"

        testCase "auto picks the CPU when there is no GPU; cuda without one is an error" <| fun () ->
            if Native.cudaAvailable () then
                Expect.equal (Native.resolveDevice Native.Auto).``type`` DeviceType.CUDA "auto takes the GPU"
            else
                Expect.equal (Native.resolveDevice Native.Auto).``type`` DeviceType.CPU "auto falls to CPU"
                Expect.throwsT<System.InvalidOperationException> (fun () -> Native.resolveDevice Native.Cuda |> ignore) "no silent fallback"

        testCase "the same seed repeats CPU random draws" <| fun () ->
            let draw () =
                Native.seedAll 17
                use r = torch.randn (5L)
                Tensors.toFloats r
            Expect.sequenceEqual (draw ()) (draw ()) "same seed, same draws"

        testCase "shape errors name the expected layout" <| fun () ->
            use t = torch.zeros ([| 4L; 3L; 8L |], dtype = torch.int64)
            let ex = Expect.throwsC (fun () -> Tensors.expectFloat "logits" "[T; E]" 2 t) id
            Expect.stringContains ex.Message "expected logits [T; E] floating point, got [4; 3; 8] int64" "message"
    ]
