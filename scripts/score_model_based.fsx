// BERTScore and SummaC of summaries: a run folder's predictions (what `moe train`/`moe summarize` wrote) or aligned
// prediction/reference/document files, with checkpoint folders you bring (roberta-large for BERTScore,
// roberta-large-mnli for SummaC). Prints the score table (ROUGE, BLEU, BERTScore and SummaC with bootstrap intervals).
//
//   dotnet fsi scripts/score_model_based.fsx --smoke     # roberta-tiny and roberta-tiny-mnli on 3 shared XSum pairs
//   dotnet fsi scripts/score_model_based.fsx --run runs/topk --bertscore ~/checkpoints/roberta-large --summac ~/checkpoints/roberta-large-mnli
//   dotnet fsi scripts/score_model_based.fsx -p P -r R -d D --bertscore DIR [--bertscore-layer N] [--bertscore-idf] [--summac DIR]
//
// The same metrics inside a run: `moe train --set Eval.BertScoreModel=DIR --set Eval.SummaCModel=DIR`,
// `moe summarize --model M --data D --bertscore DIR --summac DIR` (see the README).
#load "prelude.fsx"

open System.IO
open Moe

let main (args: string[]) =
    Native.initialise ()
    let shared = Path.GetFullPath(Path.Combine(__SOURCE_DIRECTORY__, "..", "..", "shared"))
    Baseline.modelMetricsScript (printfn "%s") shared args |> ignore

main (fsi.CommandLineArgs |> Array.tail)
