/// `Moe.HfSeq2Seq`: every shared encoder-decoder checkpoint loads by its model_type, and the record's loss is
/// the one transformers' forward returned (cross-entropy plus Switch's weighted router losses).
module Moe.Tests.HfSeq2SeqTests

open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Moe
open Moe.Tests.Support

let private modelDir (data: string) (name: string) = Path.GetFullPath(Path.Combine(data, "..", "models", name))

let private ints (e: JsonElement) : int64[] = [| for x in e.EnumerateArray() -> x.GetInt64() |]

let private matrix (e: JsonElement) : torch.Tensor =
    let rows = [| for r in e.EnumerateArray() -> ints r |]
    torch.tensor(Array.concat rows).reshape(int64 rows.Length, int64 rows[0].Length)

/// Folder, its model_type, and the sample_outputs.json key holding one teacher-forced example.
let private checkpoints =
    [ "bart-tiny", "bart", "doc0_alone"
      "pegasus-tiny", "pegasus", "doc0_alone"
      "t5-tiny", "t5", "doc0_alone"
      "flan-t5-tiny", "t5", "doc0_alone"
      "switch-tiny", "switch_transformers", "src0_alone"
      "switch-tiny-capacity2", "switch_transformers", "src0_alone" ]

let tests =
    testSequenced <| testList "HfSeq2Seq" [
        for name, modelType, key in checkpoints do
            testWithShared (sprintf "%s loads as %s and its loss is transformers'" name modelType) (fun data ->
                let dir = modelDir data name
                use _ = torch.NewDisposeScope()
                use model = HfSeq2Seq.load dir
                Expect.equal model.ModelType modelType "model_type"
                use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "sample_outputs.json")))
                let ex = doc.RootElement.GetProperty key
                let ids = matrix (ex.GetProperty "input_ids")
                let mask = (matrix (ex.GetProperty "attention_mask")).to_type torch.ScalarType.Bool
                let labels = matrix (ex.GetProperty "labels")
                use _ = torch.no_grad ()
                let loss, _ = model.Loss ids mask labels
                let expected = ex.GetProperty("loss").GetDouble()
                Expect.isLessThan (abs (Tensors.scalar loss - expected)) Tol.f32Loose (sprintf "loss %g vs transformers' %g" (Tensors.scalar loss) expected))

        testWithShared "an unknown model_type is refused naming the file and the supported ones" (fun data ->
            let dir = Path.Combine(Path.GetTempPath(), sprintf "moe-hfseq2seq-%d" (System.Random.Shared.Next()))
            Directory.CreateDirectory dir |> ignore
            try
                File.WriteAllText(Path.Combine(dir, "config.json"), """{"model_type": "gpt_neox"}""")
                let e = Expect.throwsC (fun () -> HfSeq2Seq.load dir |> ignore) id
                Expect.stringContains e.Message "config.json" "names the file"
                Expect.stringContains e.Message "gpt_neox" "names the value"
                Expect.stringContains e.Message "switch_transformers" "lists the supported ones"
            finally Directory.Delete(dir, true))
    ]
