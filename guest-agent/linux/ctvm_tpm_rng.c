// SPDX-License-Identifier: GPL-2.0
/*
 * /dev/hwrng from the TPM, for kernels built without CONFIG_HW_RANDOM_TPM
 * (Debian's cloud kernel): the glue tpm-chip.c registers when that option is
 * on, over the TPM core's exported tpm_default_chip() and tpm_get_random().
 * Under CTVM the TPM is the guest's own vTPM.
 */
#include <linux/hw_random.h>
#include <linux/minmax.h>
#include <linux/module.h>
#include <linux/tpm.h>

/* The TPM core's TPM_MAX_RNG_DATA: more per call is refused. */
#define RNG_MAX 128

static struct tpm_chip *chip;

static int tpm_rng_read(struct hwrng *rng, void *data, size_t max, bool wait)
{
	return tpm_get_random(chip, data, min_t(size_t, max, RNG_MAX));
}

static struct hwrng tpm_rng = {
	.name = "ctvm-tpm-rng",
	.read = tpm_rng_read,
};

static int __init tpm_rng_init(void)
{
	int ret;

	chip = tpm_default_chip();
	if (!chip)
		return -ENODEV;
	ret = hwrng_register(&tpm_rng);
	if (ret)
		put_device(&chip->dev);
	return ret;
}

static void __exit tpm_rng_exit(void)
{
	hwrng_unregister(&tpm_rng);
	put_device(&chip->dev);
}

module_init(tpm_rng_init);
module_exit(tpm_rng_exit);
MODULE_DESCRIPTION("hwrng over the default TPM (for kernels without CONFIG_HW_RANDOM_TPM)");
MODULE_LICENSE("GPL");
