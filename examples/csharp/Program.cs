// Builds a sparse MoE layer from C#, runs one forward and backward pass, and prints the routing statistics.
// Uses only the C# API (namespace MoeToolkit) and TorchSharp.
using MoeToolkit;
using TorchSharp;

namespace MoeExample;

public static class Program
{
    // A small layer: 4 experts, top-2, SwiGLU experts, capacity factor 1.25 (Switch Transformer's usual value).
    const int ModelDim = 32;
    const int ExpertHidden = 64;
    const int Experts = 4;
    const int K = 2;
    const double CapacityFactor = 1.25;
    const int Tokens = 256;
    const int Seed = 7;

    public static int Main()
    {
        Run(Console.Out);
        return 0;
    }

    /// <summary>Runs the example, writing its report to <paramref name="output"/>.</summary>
    public static void Run(TextWriter output)
    {
        MoeRuntime.Initialize();
        MoeRuntime.Seed(Seed);
        using var scope = torch.NewDisposeScope();

        using var layer = new MoeLayer(new MoeLayerOptions
        {
            ModelDim = ModelDim,
            ExpertHidden = ExpertHidden,
            Activation = ExpertActivation.SwiGlu,
            Router = new RouterOptions { Experts = Experts, TopK = K, CapacityFactor = CapacityFactor },
        });
        layer.Train();
        var x = torch.randn(Tokens, ModelDim);
        var target = torch.randn(Tokens, ModelDim);

        using var result = layer.Forward(x);
        var loss = torch.nn.functional.mse_loss(result.Output, target) + result.AuxLoss();
        loss.backward();

        var stats = result.Statistics;
        var aux = result.AuxLosses;
        output.WriteLine($"MoE layer: {Experts} experts, top-{K}, d = {ModelDim}, expert hidden = {ExpertHidden}, {Tokens} tokens");
        output.WriteLine($"tokens per expert: {string.Join(" ", stats.TokensPerExpert.Select(f => f.ToString("F3")))}");
        output.WriteLine($"load CV: {stats.LoadCv:F4}");
        output.WriteLine($"dropped fraction: {stats.DroppedFraction:F4}");
        output.WriteLine($"router entropy: {stats.RouterEntropy:F4} nats");
        output.WriteLine($"aux losses: switch {aux.SwitchAux.item<float>():F4}, importance {aux.Importance.item<float>():F4}, " +
                         $"load {aux.Load.item<float>():F4}, z {aux.ZLoss.item<float>():F4}");
        output.WriteLine($"loss: {loss.item<float>():F4}");
        foreach (var (name, p) in layer.NamedParameters())
            output.WriteLine($"grad norm {name}: {p.grad!.norm().item<float>():F6}");
    }
}
